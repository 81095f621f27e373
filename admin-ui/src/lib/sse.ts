/** One server-sent event: its name (`message` when unnamed) and data. */
export interface SseEvent {
  event: string;
  data: string;
}

/**
 * An incremental server-sent-events parser: feed it text as it arrives (in
 * any pieces), get whole events back. Comments (keep-alives) and events
 * without data are skipped; CRLF and LF framing both work.
 */
export class SseParser {
  private buf = "";
  /** A CR that ended the last piece: the LF of its CRLF may come next. */
  private cr = false;

  feed(chunk: string): SseEvent[] {
    let text = this.cr ? `\r${chunk}` : chunk;
    this.cr = text.endsWith("\r");
    if (this.cr) text = text.slice(0, -1);
    this.buf += text.replace(/\r\n?/g, "\n");
    const out: SseEvent[] = [];
    let end: number;
    while ((end = this.buf.indexOf("\n\n")) >= 0) {
      const block = this.buf.slice(0, end);
      this.buf = this.buf.slice(end + 2);
      let event = "message";
      const data: string[] = [];
      for (const line of block.split("\n")) {
        if (line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let value = colon < 0 ? "" : line.slice(colon + 1);
        if (value.startsWith(" ")) value = value.slice(1);
        if (field === "event") event = value;
        else if (field === "data") data.push(value);
      }
      if (data.length > 0) out.push({ event, data: data.join("\n") });
    }
    return out;
  }
}
