/**
 * Live gateway state from `GET /api/events`: a snapshot, then pushed key,
 * upstream and per-second changes. Read with `fetch` (an `EventSource`
 * cannot send the session's `Authorization` header); reconnects with
 * backoff, starting from a fresh snapshot.
 */
import { authHeader, end } from "./api";
import { SseParser } from "./sse";

export interface PoolKey {
  id: string;
  masked: string;
  state: "active" | "resting" | "cooling" | "disabled" | "deleted";
  until_ms: number | null;
  reason: string | null;
  /** Why the key is disabled (the provider's 401/403 streak, or an admin). */
  disabled_reason: string | null;
  /** Unix ms of the next re-probe of a key the provider disabled; null otherwise. */
  next_probe_at: number | null;
  consecutive_failures: number;
  in_flight: number;
  probing: boolean;
  last_error: string | null;
  last_error_ms: number | null;
  source: string;
  weight: number;
  totals: { requests: number; errors: number; tokens: number; last_used_ms: number | null };
  models: Record<string, { state: string; until_ms: number | null; reason: string | null }>;
}

export interface PoolInfo {
  name: string;
  strategy: string;
  cooldown_scope: string;
  keys: number;
  states: Record<string, number>;
  in_flight: number;
}

export interface Upstream {
  name: string;
  provider: string;
  endpoints: string[];
  addresses: { address?: string; endpoint?: string; healthy?: boolean; resting?: boolean }[];
  key_pool: string | null;
  in_flight: number;
  max_in_flight: number;
}

export interface Tick {
  ts_ms: number;
  requests_per_s: number;
  errors_per_s: number;
  rate_limited_per_s: number;
  prompt_tokens_per_s: number;
  completion_tokens_per_s: number;
  in_flight: number;
  streams_in_flight: number;
  lifecycle: string;
}

/** Ticks kept for the live chart: 15 minutes. */
const KEEP_TICKS = 900;

export class Live {
  pools: { pool: PoolInfo; keys: PoolKey[] }[] = $state([]);
  upstreams: Upstream[] = $state([]);
  ticks: Tick[] = $state([]);
  connected = $state(false);
  error = $state("");
  private abort: AbortController | null = null;

  start(): void {
    if (this.abort) return;
    this.abort = new AbortController();
    void this.run(this.abort.signal);
  }

  stop(): void {
    this.abort?.abort();
    this.abort = null;
    this.connected = false;
  }

  private async run(signal: AbortSignal): Promise<void> {
    let delay = 500;
    while (!signal.aborted) {
      try {
        const r = await fetch("/api/events", { headers: authHeader(), signal });
        if (r.status === 401) {
          end("Your session expired. Log in again.");
          return;
        }
        if (!r.ok || !r.body) throw new Error(`the event stream answered ${r.status}`);
        this.connected = true;
        this.error = "";
        delay = 500;
        const parser = new SseParser();
        const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          for (const e of parser.feed(value)) this.apply(e.event, JSON.parse(e.data));
        }
        throw new Error("the event stream ended");
      } catch (e) {
        if (signal.aborted) return;
        this.connected = false;
        this.error = `Live updates interrupted (${(e as Error).message}); reconnecting…`;
        await new Promise((ok) => setTimeout(ok, delay));
        delay = Math.min(delay * 2, 10_000);
      }
    }
  }

  private apply(event: string, data: any): void {
    switch (event) {
      case "snapshot":
        this.pools = data.pools;
        this.upstreams = data.upstreams;
        break;
      case "keys":
        for (const change of data as { pool: string; key: PoolKey }[]) {
          const p = this.pools.find((x) => x.pool.name === change.pool);
          if (!p) continue;
          const i = p.keys.findIndex((k) => k.id === change.key.id);
          if (change.key.state === "deleted") {
            if (i >= 0) p.keys.splice(i, 1);
          } else if (i >= 0) {
            p.keys[i] = change.key;
          } else {
            p.keys.push(change.key);
          }
        }
        break;
      case "upstreams":
        for (const u of data as Upstream[]) {
          const i = this.upstreams.findIndex((x) => x.name === u.name);
          if (i >= 0) this.upstreams[i] = u;
          else this.upstreams.push(u);
        }
        break;
      case "tick":
        this.ticks.push(data as Tick);
        if (this.ticks.length > KEEP_TICKS) this.ticks.splice(0, this.ticks.length - KEEP_TICKS);
        break;
    }
  }
}

/** One live feed for the whole app. */
export const live = new Live();
