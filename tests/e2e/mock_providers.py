"""Mock upstreams speaking the OpenAI, Anthropic and Gemini wire formats, as
the providers do: JSON answers, SSE streams event by event (spread over
time), tool calls when tools are offered, and the tool result echoed back.
Every request is recorded for the tests to inspect."""

import gzip
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

INTERVAL = 0.03
SEEN = []


def last_tool_result(body):
    """The text of a tool result the request answers with, if any."""
    for m in reversed(body.get("messages") or []):
        if m.get("role") == "tool":
            return m["content"] if isinstance(m["content"], str) else json.dumps(m["content"])
        content = m.get("content")
        if isinstance(content, list):
            for b in content:
                if b.get("type") == "tool_result":
                    c = b.get("content")
                    return c if isinstance(c, str) else "".join(x.get("text", "") for x in c or [])
        return None
    for c in reversed(body.get("contents") or []):
        for p in c.get("parts", []):
            if "functionResponse" in p:
                return json.dumps(p["functionResponse"]["response"])
        return None
    return None


def has_image(body):
    """Whether the last user turn carries an image, in any format."""
    text = json.dumps((body.get("messages") or body.get("contents") or [{}])[-1])
    return any(k in text for k in ('"image_url"', '"type": "image"', '"inlineData"'))


def wants_reasoning(body):
    return bool(body.get("reasoning_effort")) or (body.get("thinking") or {}).get("type") == "enabled" or (
        ((body.get("generationConfig") or {}).get("thinkingConfig") or {}).get("includeThoughts"))


def call_args(name):
    """The arguments the mock calls a tool with: Codex CLI's shell tools get
    a command whose output proves it ran, anything else a city."""
    if name == "exec_command":
        return {"cmd": "echo codex-ran-$((6*7))"}
    if name == "shell":
        return {"command": ["bash", "-lc", "echo codex-ran-$((6*7))"]}
    return {"city": "Paris"}


def thirds(text):
    n = max(1, len(text) // 3)
    return [text[:n], text[n:2 * n], text[2 * n:]]


def wants_tool(body):
    return bool(body.get("tools")) and last_tool_result(body) is None


def upstream_count(body):
    """The mock's own token count: a third of the characters of every text
    field (FastGate's estimate is a quarter, so a test can tell them apart)."""
    def chars(v):
        if isinstance(v, dict):
            return sum(len(x) if k == "text" and isinstance(x, str) else chars(x) for k, x in v.items())
        if isinstance(v, list):
            return sum(chars(x) for x in v)
        return 0
    return chars(body) // 3


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def log_message(self, *args):
        pass

    def do_GET(self):
        SEEN.append({"path": self.path, "headers": dict(self.headers), "body": None})
        if self.path.startswith("/v1beta/models"):
            return self.json(200, {"models": [{"name": "models/upstream-gemini", "supportedGenerationMethods": ["generateContent"]}]})
        if "anthropic-version" in {k.lower() for k in self.headers.keys()}:
            return self.json(200, {"data": [{"type": "model", "id": "upstream-claude", "display_name": "Upstream Claude", "created_at": "2025-01-01T00:00:00Z"}],
                                   "has_more": False, "first_id": "upstream-claude", "last_id": "upstream-claude"})
        self.json(200, {"object": "list", "data": [{"id": "upstream-gpt", "object": "model", "created": 0, "owned_by": "mock"}]})

    def do_POST(self):
        raw = self.rfile.read(int(self.headers.get("content-length", 0)))
        body = json.loads(raw or b"{}")
        SEEN.append({"path": self.path, "headers": dict(self.headers), "body": body})
        if self.path.startswith("/v1/embeddings"):
            self.openai_embeddings(body)
        elif ":batchEmbedContents" in self.path or ":embedContent" in self.path:
            self.gemini_embeddings(body)
        elif self.path.startswith("/v1/chat/completions"):
            self.openai(body)
        elif self.path.startswith("/v1/messages/count_tokens"):
            self.json(200, {"input_tokens": upstream_count(body)})
        elif ":countTokens" in self.path:
            self.json(200, {"totalTokens": upstream_count(body)})
        elif self.path.startswith("/v1/messages"):
            self.anthropic(body)
        elif ":generateContent" in self.path or ":streamGenerateContent" in self.path:
            self.gemini(body, ":streamGenerateContent" in self.path)
        else:
            self.json(404, {"error": {"message": "no such path"}})

    def json(self, status, obj):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        # As the providers do: JSON answers gzipped for clients that accept it.
        if "gzip" in self.headers.get("accept-encoding", ""):
            data = gzip.compress(data)
            self.send_header("content-encoding", "gzip")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def sse(self, events):
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.end_headers()
        for i, (name, data) in enumerate(events):
            if i:
                time.sleep(INTERVAL)
            frame = (f"event: {name}\n" if name else "") + f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"
            self.wfile.write(frame.encode())
            self.wfile.flush()

    def reply_text(self, body, provider):
        result = last_tool_result(body)
        if result:
            return f"The weather is {result}."
        if has_image(body):
            return "I see an image."
        return f"Hello from {provider}-mock."

    @staticmethod
    def vector(text, dims):
        v = [float(len(text)), 1.0, 0.5, 0.25]
        return v[: dims or len(v)]

    def openai_embeddings(self, body):
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        data = [{"object": "embedding", "index": i, "embedding": self.vector(t, body.get("dimensions"))} for i, t in enumerate(inputs)]
        data.reverse()  # like some servers: the index, not the order, says which is which
        self.json(200, {"object": "list", "data": data, "model": body.get("model"), "usage": {"prompt_tokens": 3, "total_tokens": 3}})

    def gemini_embeddings(self, body):
        if "requests" in body:
            out = [{"values": self.vector(r["content"]["parts"][0]["text"], r.get("outputDimensionality"))} for r in body["requests"]]
            return self.json(200, {"embeddings": out})
        self.json(200, {"embedding": {"values": self.vector(body["content"]["parts"][0]["text"], body.get("outputDimensionality"))}})

    def openai(self, body):
        model = body.get("model", "m")
        base = {"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1, "model": model}
        usage = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
        if wants_tool(body):
            name = body["tools"][0]["function"]["name"]
            if body.get("stream"):
                args = thirds(json.dumps(call_args(name)))
                ev = [dict(base, choices=[{"index": 0, "delta": {"role": "assistant", "tool_calls": [{"index": 0, "id": "call_mock1", "type": "function", "function": {"name": name, "arguments": ""}}]}, "finish_reason": None}])]
                ev += [dict(base, choices=[{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": a}}]}, "finish_reason": None}]) for a in args]
                ev.append(dict(base, choices=[{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]))
                if (body.get("stream_options") or {}).get("include_usage"):
                    ev.append(dict(base, choices=[], usage=usage))
                return self.sse([(None, e) for e in ev] + [(None, "[DONE]")])
            msg = {"role": "assistant", "content": None, "tool_calls": [{"id": "call_mock1", "type": "function", "function": {"name": name, "arguments": json.dumps(call_args(name))}}]}
            return self.json(200, {"id": "chatcmpl-mock", "object": "chat.completion", "created": 1, "model": model, "choices": [{"index": 0, "message": msg, "finish_reason": "tool_calls"}], "usage": usage})
        text = self.reply_text(body, "openai")
        if wants_reasoning(body) and not body.get("stream"):
            # An OpenAI-compatible reasoning model (vLLM, DeepSeek) shows its reasoning.
            msg = {"role": "assistant", "content": text, "reasoning_content": "Thinking it over."}
            return self.json(200, {"id": "chatcmpl-mock", "object": "chat.completion", "created": 1, "model": model, "choices": [{"index": 0, "message": msg, "finish_reason": "stop"}], "usage": usage})
        if body.get("stream"):
            words = text.split(" ")
            ev = [dict(base, choices=[{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])]
            ev += [dict(base, choices=[{"index": 0, "delta": {"content": w + (" " if i < len(words) - 1 else "")}, "finish_reason": None}]) for i, w in enumerate(words)]
            ev.append(dict(base, choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}]))
            if (body.get("stream_options") or {}).get("include_usage"):
                ev.append(dict(base, choices=[], usage=usage))
            return self.sse([(None, e) for e in ev] + [(None, "[DONE]")])
        return self.json(200, {"id": "chatcmpl-mock", "object": "chat.completion", "created": 1, "model": model, "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}], "usage": usage})

    def anthropic(self, body):
        model = body.get("model", "m")
        start = {"type": "message_start", "message": {"id": "msg_mock", "type": "message", "role": "assistant", "model": model, "content": [], "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 11, "output_tokens": 1}}}
        if wants_tool(body):
            name = body["tools"][0]["name"]
            if body.get("stream"):
                return self.sse([
                    ("message_start", start),
                    ("ping", {"type": "ping"}),
                    ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "tool_use", "id": "toolu_mock1", "name": name, "input": {}}}),
                    *[("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": piece}})
                      for piece in thirds(json.dumps(call_args(name)))],
                    ("content_block_stop", {"type": "content_block_stop", "index": 0}),
                    ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None}, "usage": {"output_tokens": 7}}),
                    ("message_stop", {"type": "message_stop"}),
                ])
            return self.json(200, {"id": "msg_mock", "type": "message", "role": "assistant", "model": model, "content": [{"type": "tool_use", "id": "toolu_mock1", "name": name, "input": call_args(name)}], "stop_reason": "tool_use", "stop_sequence": None, "usage": {"input_tokens": 11, "output_tokens": 7}})
        text = self.reply_text(body, "anthropic")
        if wants_reasoning(body) and not body.get("stream"):
            content = [{"type": "thinking", "thinking": "Thinking it over.", "signature": "EqQBmockSignature=="}, {"type": "text", "text": text}]
            return self.json(200, {"id": "msg_mock", "type": "message", "role": "assistant", "model": model, "content": content, "stop_reason": "end_turn", "stop_sequence": None, "usage": {"input_tokens": 11, "output_tokens": 7}})
        if body.get("stream"):
            words = text.split(" ")
            ev = [("message_start", start), ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})]
            ev += [("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": w + (" " if i < len(words) - 1 else "")}}) for i, w in enumerate(words)]
            ev += [("content_block_stop", {"type": "content_block_stop", "index": 0}),
                   ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None}, "usage": {"output_tokens": 7}}),
                   ("message_stop", {"type": "message_stop"})]
            return self.sse(ev)
        return self.json(200, {"id": "msg_mock", "type": "message", "role": "assistant", "model": model, "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": None, "usage": {"input_tokens": 11, "output_tokens": 7}})

    def gemini(self, body, stream):
        model = self.path.split("/models/")[1].split(":")[0]
        def chunk(parts, finish=None, n=1):
            c = {"candidates": [{"content": {"role": "model", "parts": parts}, "index": 0}], "usageMetadata": {"promptTokenCount": 11, "candidatesTokenCount": n, "totalTokenCount": 11 + n}, "modelVersion": model, "responseId": "resp-mock"}
            if finish:
                c["candidates"][0]["finishReason"] = finish
            return c
        if wants_tool(body):
            name = body["tools"][0]["functionDeclarations"][0]["name"]
            c = chunk([{"functionCall": {"name": name, "args": call_args(name)}}], "STOP", 7)
            return self.sse([(None, c)]) if stream else self.json(200, c)
        text = self.reply_text(body, "gemini")
        if wants_reasoning(body) and not stream:
            return self.json(200, chunk([{"text": "Thinking it over.", "thought": True}, {"text": text}], "STOP", 7))
        if stream:
            words = text.split(" ")
            ev = [chunk([{"text": w + (" " if i < len(words) - 1 else "")}], "STOP" if i == len(words) - 1 else None, i + 1) for i, w in enumerate(words)]
            return self.sse([(None, e) for e in ev])
        return self.json(200, chunk([{"text": text}], "STOP", 7))


def start():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
