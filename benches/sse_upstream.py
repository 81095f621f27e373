#!/usr/bin/env python3
"""A minimal SSE upstream for TTFB and conversion measurements: answers
every request at once with `text/event-stream` headers and a first event,
then EVENTS more events (10 by default) DELAY ms apart (5 by default; 0 for
load runs), in OpenAI's format, or Anthropic's for `/v1/messages`.
Keep-alive, chunked, HTTP/1.1. Usage: sse_upstream.py PORT [DELAY_MS [EVENTS]]"""
import asyncio
import sys

EVENT = b'data: {"choices":[{"index":0,"delta":{"content":"tok"}}]}\n\n'
DONE = b"data: [DONE]\n\n"
DELAY = (float(sys.argv[2]) if len(sys.argv) > 2 else 5.0) / 1000
EVENTS = int(sys.argv[3]) if len(sys.argv) > 3 else 10
ANTHROPIC_START = (
    b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1","type":"message",'
    b'"role":"assistant","model":"m","content":[],"usage":{"input_tokens":12,"output_tokens":1}}}\n\n'
    b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
    b'"content_block":{"type":"text","text":""}}\n\n'
)
ANTHROPIC_EVENT = (
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
    b'"delta":{"type":"text_delta","text":"tok"}}\n\n'
)
ANTHROPIC_DONE = (
    b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
    b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn"},'
    b'"usage":{"output_tokens":11}}\n\nevent: message_stop\ndata: {"type":"message_stop"}\n\n'
)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            anthropic = head.split(b" ", 2)[1].startswith(b"/v1/messages")
            first, event, done = (
                (ANTHROPIC_START + ANTHROPIC_EVENT, ANTHROPIC_EVENT, ANTHROPIC_DONE)
                if anthropic
                else (EVENT, EVENT, DONE)
            )
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            if length:
                await reader.readexactly(length)
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                b"transfer-encoding: chunked\r\n\r\n" + chunk(first)
            )
            await writer.drain()
            for _ in range(EVENTS):
                if DELAY:
                    await asyncio.sleep(DELAY)
                writer.write(chunk(event))
            writer.write(chunk(done) + b"0\r\n\r\n")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main() -> None:
    server = await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1]), backlog=4096)
    async with server:
        await server.serve_forever()


asyncio.run(main())
