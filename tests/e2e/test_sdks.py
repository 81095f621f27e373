"""Every official SDK against every provider through FastGate: chat,
streaming (chunks spread over time), a tool call and a full tool round trip.
Asserts on what the SDK returned and on what the upstream received."""

import itertools
import json
import time

import anthropic
import openai
import pytest
from google import genai
from google.genai import types

import mock_providers

FORMATS = ["openai", "anthropic", "gemini"]
PAIRS = list(itertools.product(FORMATS, FORMATS))
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}

UPSTREAM_PATH = {
    "openai": "/v1/chat/completions",
    "anthropic": "/v1/messages",
    "gemini": "/v1beta/models/mock-model:",
}


def last_upstream(up):
    seen = mock_providers.SEEN[-1]
    assert seen["path"].startswith(UPSTREAM_PATH[up]), seen["path"]
    key = {"openai": "authorization", "anthropic": "x-api-key", "gemini": "x-goog-api-key"}[up]
    assert any(k.lower() == key for k in seen["headers"]), seen["headers"]
    return seen


class Client:
    """One SDK pointed at one route, with a uniform surface for the tests."""

    def __init__(self, gateway, fmt, up):
        self.fmt = fmt
        base = f"{gateway}/{fmt}-{up}"
        if fmt == "openai":
            self.c = openai.OpenAI(base_url=f"{base}/v1", api_key="client-key", max_retries=0)
        elif fmt == "anthropic":
            self.c = anthropic.Anthropic(base_url=base, api_key="client-key", max_retries=0)
        else:
            self.c = genai.Client(api_key="client-key", http_options=types.HttpOptions(base_url=base, api_version="v1beta"))

    def chat(self, text):
        if self.fmt == "openai":
            r = self.c.chat.completions.create(model="mock-model", messages=[{"role": "user", "content": text}])
            return r.choices[0].message.content
        if self.fmt == "anthropic":
            r = self.c.messages.create(model="mock-model", max_tokens=100, messages=[{"role": "user", "content": text}])
            return "".join(b.text for b in r.content if b.type == "text")
        return self.c.models.generate_content(model="mock-model", contents=text).text

    def stream(self, text):
        """(the text, arrival times of the pieces)"""
        pieces, times = [], []
        if self.fmt == "openai":
            s = self.c.chat.completions.create(model="mock-model", stream=True, stream_options={"include_usage": True},
                                               messages=[{"role": "user", "content": text}])
            for chunk in s:
                if chunk.choices and chunk.choices[0].delta.content:
                    pieces.append(chunk.choices[0].delta.content)
                    times.append(time.monotonic())
        elif self.fmt == "anthropic":
            with self.c.messages.stream(model="mock-model", max_tokens=100, messages=[{"role": "user", "content": text}]) as s:
                for t in s.text_stream:
                    pieces.append(t)
                    times.append(time.monotonic())
                final = s.get_final_message()
                assert final.stop_reason == "end_turn"
        else:
            for chunk in self.c.models.generate_content_stream(model="mock-model", contents=text):
                if chunk.text:
                    pieces.append(chunk.text)
                    times.append(time.monotonic())
        return "".join(pieces), times

    def tool_round_trip(self):
        """Ask with a tool, check the call, answer it; the final text."""
        if self.fmt == "openai":
            tools = [{"type": "function", "function": {"name": "weather", "parameters": WEATHER}}]
            msgs = [{"role": "user", "content": "Weather in Paris?"}]
            r = self.c.chat.completions.create(model="mock-model", messages=msgs, tools=tools)
            call = r.choices[0].message.tool_calls[0]
            assert r.choices[0].finish_reason == "tool_calls"
            assert call.function.name == "weather" and json.loads(call.function.arguments) == {"city": "Paris"}
            msgs += [r.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": "18C"}]
            return self.c.chat.completions.create(model="mock-model", messages=msgs, tools=tools).choices[0].message.content
        if self.fmt == "anthropic":
            tools = [{"name": "weather", "input_schema": WEATHER}]
            msgs = [{"role": "user", "content": "Weather in Paris?"}]
            r = self.c.messages.create(model="mock-model", max_tokens=100, messages=msgs, tools=tools)
            assert r.stop_reason == "tool_use"
            call = next(b for b in r.content if b.type == "tool_use")
            assert call.name == "weather" and call.input == {"city": "Paris"}
            msgs += [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in r.content]},
                     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "18C"}]}]
            r = self.c.messages.create(model="mock-model", max_tokens=100, messages=msgs, tools=tools)
            return "".join(b.text for b in r.content if b.type == "text")
        tool = types.Tool(function_declarations=[types.FunctionDeclaration(name="weather", parameters_json_schema=WEATHER)])
        config = types.GenerateContentConfig(tools=[tool], automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True))
        contents = [types.Content(role="user", parts=[types.Part(text="Weather in Paris?")])]
        r = self.c.models.generate_content(model="mock-model", contents=contents, config=config)
        call = r.function_calls[0]
        assert call.name == "weather" and call.args == {"city": "Paris"}
        contents += [r.candidates[0].content,
                     types.Content(role="user", parts=[types.Part.from_function_response(name="weather", response={"result": "18C"})])]
        return self.c.models.generate_content(model="mock-model", contents=contents, config=config).text


@pytest.mark.parametrize("fmt,up", PAIRS)
def test_chat(gateway, fmt, up):
    text = Client(gateway, fmt, up).chat("hi")
    assert text == f"Hello from {up}-mock.", text
    seen = last_upstream(up)
    encoding = {k.lower(): v for k, v in seen["headers"].items()}.get("accept-encoding", "")
    if fmt == up:
        # Passthrough: the SDK's own Accept-Encoding reaches the mock, which
        # then gzips its answer as providers do; the SDK got it decoded.
        assert "gzip" in encoding, seen["headers"]
    else:
        assert encoding == "identity", "converted answers are asked for plain"


@pytest.mark.parametrize("fmt,up", PAIRS)
def test_stream_arrives_piece_by_piece(gateway, fmt, up):
    client = Client(gateway, fmt, up)
    # The SDKs build their event models lazily: the first stream of a
    # process spends tens of milliseconds on the first event it parses, which
    # would bunch the first pieces on the client side. Warm up, then time.
    client.stream("hi")
    text, times = client.stream("hi")
    assert text == f"Hello from {up}-mock.", text
    assert len(times) >= 3, times
    assert times[-1] - times[0] >= 0.04, ("pieces spread over time, not all at once", times)
    seen = last_upstream(up)
    if up != "gemini":
        assert seen["body"]["stream"] is True


@pytest.mark.parametrize("fmt,up", PAIRS)
def test_tool_round_trip(gateway, fmt, up):
    final = Client(gateway, fmt, up).tool_round_trip()
    assert "18C" in final, final
    # The upstream got the result in its own format, tied to its own call.
    body = last_upstream(up)["body"]
    if up == "openai":
        call = next(m for m in body["messages"] if m.get("tool_calls"))["tool_calls"][0]
        tool_msg = next(m for m in body["messages"] if m["role"] == "tool")
        assert call["id"] == tool_msg["tool_call_id"] == "call_mock1", body
    elif up == "anthropic":
        blocks = [b for m in body["messages"] if isinstance(m["content"], list) for b in m["content"]]
        call = next(b for b in blocks if b["type"] == "tool_use")
        result = next(b for b in blocks if b["type"] == "tool_result")
        assert call["id"] == result["tool_use_id"] == "toolu_mock1", body
    else:
        resp = next(p["functionResponse"] for c in body["contents"] for p in c["parts"] if "functionResponse" in p)
        assert resp["name"] == "weather"


@pytest.mark.parametrize("up", ["openai", "gemini"])
def test_a_claude_code_style_session(gateway, up):
    """Tools, streaming, `?beta=true` and `anthropic-beta`, as Claude Code
    sends them, against a non-Anthropic upstream: the event grammar holds."""
    c = anthropic.Anthropic(base_url=f"{gateway}/anthropic-{up}", api_key="client-key", max_retries=0)
    tools = [{"name": "weather", "description": "Weather by city", "input_schema": WEATHER}]
    events = []
    with c.beta.messages.stream(model="mock-model", max_tokens=1024, tools=tools,
                                betas=["interleaved-thinking-2025-05-14", "fine-grained-tool-streaming-2025-05-14"],
                                messages=[{"role": "user", "content": "Weather in Paris?"}]) as s:
        for ev in s:
            events.append(ev)
        final = s.get_final_message()
    types_ = [e.type for e in events]
    assert types_.count("message_start") == 1 and types_[0] == "message_start", types_
    assert types_[-1] == "message_stop", types_
    open_index, last_index = None, -1
    for e in events:
        if e.type == "content_block_start":
            assert open_index is None, "one block open at a time"
            assert e.index == last_index + 1, "indices rise by one"
            open_index = last_index = e.index
        elif e.type == "content_block_stop":
            assert e.index == open_index
            open_index = None
    assert open_index is None
    assert final.stop_reason == "tool_use"
    call = next(b for b in final.content if b.type == "tool_use")
    assert call.input == {"city": "Paris"}
    seen = last_upstream(up)
    assert "?beta=true" not in seen["path"]
    assert not any(k.lower() in ("anthropic-beta", "anthropic-version") for k in seen["headers"]), seen["headers"]


EMBEDDING_PAIRS = [("openai", "openai"), ("openai", "gemini"), ("gemini", "gemini"), ("gemini", "openai")]


@pytest.mark.parametrize("fmt,up", EMBEDDING_PAIRS)
def test_embeddings_keep_order_and_dimensions(gateway, fmt, up):
    c = Client(gateway, fmt, up).c
    texts = ["a", "bbb", "cc"]
    if fmt == "openai":
        # The SDK asks for base64 vectors by default and decodes them.
        r = c.embeddings.create(model="mock-embed", input=texts, dimensions=3)
        vectors = [d.embedding for d in sorted(r.data, key=lambda d: d.index)]
    else:
        r = c.models.embed_content(model="mock-embed", contents=texts, config=types.EmbedContentConfig(output_dimensionality=3))
        vectors = [e.values for e in r.embeddings]
    assert vectors == [[1.0, 1.0, 0.5], [3.0, 1.0, 0.5], [2.0, 1.0, 0.5]], vectors
    seen = mock_providers.SEEN[-1]
    if up == "gemini":
        assert ":batchEmbedContents" in seen["path"]
        assert seen["body"]["requests"][0]["outputDimensionality"] == 3
    else:
        assert seen["path"] == "/v1/embeddings" and seen["body"]["dimensions"] == 3


@pytest.mark.parametrize("fmt,up", [(f, u) for f, u in PAIRS if f != u])
def test_model_lists_in_the_clients_shape(gateway, fmt, up):
    c = Client(gateway, fmt, up).c
    if fmt == "openai":
        ids = [m.id for m in c.models.list()]
    elif fmt == "anthropic":
        ids = [m.id for m in c.models.list()]
    else:
        ids = [m.name.removeprefix("models/") for m in c.models.list()]
    assert "alias-model" in ids and "mock-model" in ids, ids


def test_embeddings_to_anthropic_are_refused_clearly(gateway):
    c = Client(gateway, "openai", "anthropic").c
    with pytest.raises(openai.BadRequestError) as e:
        c.embeddings.create(model="mock-embed", input="x")
    assert "no embeddings API" in str(e.value)


@pytest.mark.parametrize("fmt,up", [("anthropic", "openai"), ("anthropic", "gemini"), ("gemini", "openai"), ("gemini", "anthropic")])
def test_token_counts_ask_the_upstream_where_it_can_count(gateway, fmt, up):
    c = Client(gateway, fmt, up).c
    before = len(mock_providers.SEEN)
    text = "Count the tokens of this sentence, please. " * 10
    if fmt == "anthropic":
        n = c.messages.count_tokens(model="mock-model", messages=[{"role": "user", "content": text}]).input_tokens
    else:
        n = c.models.count_tokens(model="mock-model", contents=text).total_tokens
    if up == "openai":
        # Chat Completions has no counting endpoint: FastGate's estimate.
        assert abs(n - len(text) / 4) <= 2, n
        assert len(mock_providers.SEEN) == before, "answered by FastGate, not sent upstream"
        return
    assert n == len(text) // 3, f"the upstream's own count: {n}"
    seen = mock_providers.SEEN[-1]
    if up == "anthropic":
        assert seen["path"] == "/v1/messages/count_tokens", seen["path"]
        assert set(seen["body"]) <= {"model", "messages", "system", "tools", "tool_choice", "thinking"}, seen["body"]
        assert seen["body"]["messages"][0]["content"][0]["text"] == text
    else:
        assert seen["path"].endswith("/models/mock-model:countTokens"), seen["path"]
        inner = seen["body"]["generateContentRequest"]
        assert inner["model"] == "models/mock-model"
        assert inner["contents"][0]["parts"][0]["text"] == text


PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="


@pytest.mark.parametrize("fmt,up", PAIRS)
def test_an_image_reaches_every_provider(gateway, fmt, up):
    c = Client(gateway, fmt, up).c
    if fmt == "openai":
        r = c.chat.completions.create(model="mock-model", messages=[{"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}]}])
        text = r.choices[0].message.content
    elif fmt == "anthropic":
        r = c.messages.create(model="mock-model", max_tokens=100, messages=[{"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}]}])
        text = r.content[0].text
    else:
        import base64
        r = c.models.generate_content(model="mock-model", contents=[types.Content(role="user", parts=[
            types.Part(text="What is this?"), types.Part.from_bytes(data=base64.b64decode(PNG), mime_type="image/png")])])
        text = r.text
    assert text == "I see an image.", text
    body = json.dumps(last_upstream(up)["body"])
    assert PNG in body, "the image's bytes reached the upstream"


@pytest.mark.parametrize("fmt,up", [(f, u) for f, u in PAIRS if f != u])
def test_a_reasoning_exchange(gateway, fmt, up):
    c = Client(gateway, fmt, up).c
    if fmt == "openai":
        r = c.chat.completions.create(model="mock-model", reasoning_effort="medium", messages=[{"role": "user", "content": "hi"}])
        text = r.choices[0].message.content
        reasoning = (r.choices[0].message.model_extra or {}).get("reasoning_content")
    elif fmt == "anthropic":
        r = c.messages.create(model="mock-model", max_tokens=2000, thinking={"type": "enabled", "budget_tokens": 1024},
                              messages=[{"role": "user", "content": "hi"}])
        text = "".join(b.text for b in r.content if b.type == "text")
        reasoning = "".join(b.thinking for b in r.content if b.type == "thinking")
        assert r.content[0].type == "thinking", "reasoning comes first, as a thinking block"
    else:
        r = c.models.generate_content(model="mock-model", contents="hi", config=types.GenerateContentConfig(
            thinking_config=types.ThinkingConfig(thinking_budget=1024, include_thoughts=True)))
        text = "".join(p.text for p in r.candidates[0].content.parts if p.text and not p.thought)
        reasoning = "".join(p.text for p in r.candidates[0].content.parts if p.text and p.thought)
    assert text == f"Hello from {up}-mock.", text
    assert reasoning == "Thinking it over.", reasoning
    # The upstream was asked to reason, its own way.
    body = last_upstream(up)["body"]
    asked = {"openai": lambda b: b.get("reasoning_effort"),
             "anthropic": lambda b: b.get("thinking", {}).get("budget_tokens", 0) >= 1024,
             "gemini": lambda b: b["generationConfig"]["thinkingConfig"]["thinkingBudget"] > 0}[up](body)
    assert asked, body


# --- The Responses API (what Codex CLI speaks) toward every provider ------

RESPONSES_TOOLS = [{"type": "function", "name": "weather", "description": "Weather by city", "parameters": WEATHER}]


def responses_client(gateway, up):
    return openai.OpenAI(base_url=f"{gateway}/responses-{up}/v1", api_key="client-key", max_retries=0)


@pytest.mark.parametrize("up", FORMATS)
def test_responses_create(gateway, up):
    r = responses_client(gateway, up).responses.create(model="alias-model", instructions="Be brief.", input="hi",
                                                        max_output_tokens=200)
    assert r.object == "response" and r.status == "completed", r
    assert r.output_text == f"Hello from {up}-mock.", r.output_text
    assert r.usage.input_tokens == 11 and r.usage.output_tokens == 7 and r.usage.total_tokens == 18, r.usage
    body = last_upstream(up)["body"]
    # Toward Anthropic the system prompt is one text block carrying a prompt
    # cache breakpoint (upstream capability `prompt_cache`, on by default).
    instructions = {"openai": lambda b: b["messages"][0]["content"],
                    "anthropic": lambda b: b["system"][0]["text"],
                    "gemini": lambda b: b["systemInstruction"]["parts"][0]["text"]}[up](body)
    assert instructions == "Be brief.", body
    if up == "anthropic":
        assert body["system"] == [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}], body


@pytest.mark.parametrize("up", FORMATS)
def test_responses_stream_follows_the_event_grammar(gateway, up):
    c = responses_client(gateway, up)
    events = list(c.responses.create(model="mock-model", input="hi", stream=True))
    kinds = [e.type for e in events]
    assert [e.sequence_number for e in events] == list(range(len(events))), kinds
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"], kinds
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"], kinds
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == f"Hello from {up}-mock.", text
    final = events[-1].response
    # The mock's usage: 7 output tokens, Gemini's stream one per word.
    assert final.output_text == text and final.usage.output_tokens == (3 if up == "gemini" else 7), final
    # The SDK's own stream helper assembles the same answer.
    with c.responses.stream(model="mock-model", input="hi") as s:
        pieces = [e.delta for e in s if e.type == "response.output_text.delta"]
        assert s.get_final_response().output_text == "".join(pieces) == text


@pytest.mark.parametrize("up", FORMATS)
@pytest.mark.parametrize("stream", [False, True])
def test_responses_tool_round_trip(gateway, up, stream):
    c = responses_client(gateway, up)
    conversation = [{"role": "user", "content": "Weather in Paris?"}]
    if stream:
        with c.responses.stream(model="mock-model", input=conversation, tools=RESPONSES_TOOLS) as s:
            kinds = [e.type for e in s]
            r = s.get_final_response()
        assert "response.function_call_arguments.done" in kinds, kinds
    else:
        r = c.responses.create(model="mock-model", input=conversation, tools=RESPONSES_TOOLS)
    call = next(i for i in r.output if i.type == "function_call")
    assert call.name == "weather" and json.loads(call.arguments) == {"city": "Paris"}, call
    conversation += [i.model_dump(exclude_none=True) for i in r.output]
    conversation.append({"type": "function_call_output", "call_id": call.call_id, "output": "18C"})
    final = c.responses.create(model="mock-model", input=conversation, tools=RESPONSES_TOOLS)
    assert "18C" in final.output_text, final.output_text
    # The upstream got the call and its result in its own format, tied by id.
    body = last_upstream(up)["body"]
    if up == "openai":
        sent = next(m for m in body["messages"] if m.get("tool_calls"))["tool_calls"][0]
        result = next(m for m in body["messages"] if m["role"] == "tool")
        assert sent["id"] == result["tool_call_id"] == call.call_id == "call_mock1", body
    elif up == "anthropic":
        blocks = [b for m in body["messages"] if isinstance(m["content"], list) for b in m["content"]]
        sent = next(b for b in blocks if b["type"] == "tool_use")
        result = next(b for b in blocks if b["type"] == "tool_result")
        assert sent["id"] == result["tool_use_id"] == call.call_id == "toolu_mock1", body
    else:
        resp = next(p["functionResponse"] for c_ in body["contents"] for p in c_["parts"] if "functionResponse" in p)
        assert resp["name"] == "weather"


def test_responses_previous_response_id_is_refused(gateway):
    c = responses_client(gateway, "anthropic")
    with pytest.raises(openai.BadRequestError) as e:
        c.responses.create(model="mock-model", input="again", previous_response_id="resp_earlier")
    assert "no response store" in str(e.value)
