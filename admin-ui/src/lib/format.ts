/** A countdown to `untilMs` as `45s`, `4m 05s` or `2h 10m`; `0s` once passed. */
export function countdown(untilMs: number, nowMs: number): string {
  const s = Math.max(0, Math.ceil((untilMs - nowMs) / 1000));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${String(s % 60).padStart(2, "0")}s`;
  return `${Math.floor(s / 3600)}h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
}

/** A count in a few characters: 950, 12.3k, 4.1M. */
export function compact(n: number): string {
  if (!Number.isFinite(n)) return "–";
  const abs = Math.abs(n);
  if (abs < 1000) return String(Math.round(n * 10) / 10);
  if (abs < 1e6) return `${(n / 1e3).toFixed(abs < 1e4 ? 1 : 0)}k`;
  return `${(n / 1e6).toFixed(abs < 1e7 ? 1 : 0)}M`;
}

/** Milliseconds as `850 ms` or `1.25 s`. */
export function millis(ms: number | null | undefined): string {
  if (ms == null || !Number.isFinite(ms)) return "–";
  return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(2)} s`;
}

/** A Unix-milliseconds instant in the browser's time zone. */
export function localTime(ms: number | null | undefined): string {
  if (!ms) return "–";
  return new Date(ms).toLocaleString();
}
