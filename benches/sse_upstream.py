#!/usr/bin/env python3
"""A minimal SSE upstream for TTFB measurements: answers every request at once
with `text/event-stream` headers and a first event, then 10 more events 5 ms
apart. Keep-alive, chunked, HTTP/1.1. Usage: sse_upstream.py PORT"""
import asyncio
import sys

EVENT = b'data: {"choices":[{"index":0,"delta":{"content":"tok"}}]}\n\n'


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            if length:
                await reader.readexactly(length)
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                b"transfer-encoding: chunked\r\n\r\n" + chunk(EVENT)
            )
            await writer.drain()
            for _ in range(10):
                await asyncio.sleep(0.005)
                writer.write(chunk(EVENT))
            writer.write(chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main() -> None:
    server = await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1]))
    async with server:
        await server.serve_forever()


asyncio.run(main())
