import { describe, expect, it } from "vitest";
import { SseParser } from "./sse";

const stream = "event: snapshot\ndata: {\"a\":1}\n\n: keep-alive\n\nevent: tick\r\ndata: {\"b\":2}\r\n\r\ndata: x\ndata: y\n\n";

describe("SseParser", () => {
  it("reads named events, skips comments, joins data lines", () => {
    const events = new SseParser().feed(stream);
    expect(events).toEqual([
      { event: "snapshot", data: '{"a":1}' },
      { event: "tick", data: '{"b":2}' },
      { event: "message", data: "x\ny" },
    ]);
  });

  it("gives the same events whatever the pieces", () => {
    const whole = new SseParser().feed(stream);
    for (const size of [1, 2, 3, 7, 13]) {
      const p = new SseParser();
      const got = [];
      for (let i = 0; i < stream.length; i += size) got.push(...p.feed(stream.slice(i, i + size)));
      expect(got).toEqual(whole);
    }
  });

  it("keeps an unfinished event until its blank line", () => {
    const p = new SseParser();
    expect(p.feed("event: keys\ndata: [1]")).toEqual([]);
    expect(p.feed("\n\n")).toEqual([{ event: "keys", data: "[1]" }]);
  });
});
