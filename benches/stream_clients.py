#!/usr/bin/env python3
"""Hold N concurrent SSE streams open through a proxy and report its memory.

Opens N keep-alive HTTP/1.1 connections to 127.0.0.1:PORT (at most RAMP
connecting at once), sends one streaming chat request on each, and waits
until every stream has delivered its first event. Then it samples the
proxy's RSS (VmRSS of PID) every 0.5 s for HOLD seconds while the streams
keep flowing, prints one JSON line {streams, open, rss_kb_max, ...} and
closes every connection. Streams that end or fail early are counted, not
hidden. Usage: stream_clients.py PORT PID N [HOLD_S] (FG_KEY from the env)."""
import asyncio
import json
import os
import sys
import time

PORT, PID, N = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
HOLD = float(sys.argv[4]) if len(sys.argv) > 4 else 5.0
RAMP = 200
BODY = b'{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"Count slowly."}]}'
REQUEST = (
    b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
    b"authorization: Bearer " + os.environ.get("FG_KEY", "none").encode() + b"\r\n"
    b"content-length: %d\r\n\r\n" % len(BODY) + BODY
)


def rss_kb() -> int:
    with open(f"/proc/{PID}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Stats:
    open = 0
    first_event = 0
    failed = 0
    ended_early = 0
    events = 0


async def stream(stats: Stats, gate: asyncio.Semaphore, stop: asyncio.Event, conns: list) -> None:
    try:
        async with gate:
            reader, writer = await asyncio.open_connection("127.0.0.1", PORT, limit=16384)
            conns.append(writer)
            writer.write(REQUEST)
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                stats.failed += 1
                return
            await reader.readuntil(b"\n\n")
            stats.first_event += 1
            stats.open += 1
        try:
            while not stop.is_set():
                line = await reader.readuntil(b"\n\n")
                stats.events += 1
                if b"[DONE]" in line:
                    stats.ended_early += 1
                    return
        finally:
            stats.open -= 1
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        if not stop.is_set():
            stats.failed += 1


async def main() -> None:
    stats, gate, stop, conns = Stats(), asyncio.Semaphore(RAMP), asyncio.Event(), []
    idle = rss_kb()
    started = time.monotonic()
    tasks = [asyncio.create_task(stream(stats, gate, stop, conns)) for _ in range(N)]
    while stats.first_event + stats.failed < N and time.monotonic() - started < 120:
        await asyncio.sleep(0.2)
    ramp_s = time.monotonic() - started
    peak, samples, least_open = 0, [], N
    hold_end = time.monotonic() + HOLD
    while time.monotonic() < hold_end:
        samples.append(rss_kb())
        peak = max(peak, samples[-1])
        least_open = min(least_open, stats.open)
        await asyncio.sleep(0.5)
    stop.set()
    for w in conns:
        w.close()
    await asyncio.gather(*tasks, return_exceptions=True)
    print(json.dumps({
        "streams": N, "least_open_during_hold": least_open, "failed": stats.failed,
        "ended_early": stats.ended_early, "events": stats.events, "ramp_s": round(ramp_s, 1),
        "rss_kb_before": idle, "rss_kb_max": peak, "rss_kb_last": samples[-1] if samples else 0,
    }))


asyncio.run(main())
