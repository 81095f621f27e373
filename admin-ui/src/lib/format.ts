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

/** The symbol a currency is written with (`USD` → `$`), else its code. */
export function currencySymbol(currency: string): string {
  if (currency === "USD") return "$";
  try {
    const part = new Intl.NumberFormat("en", { style: "currency", currency, currencyDisplay: "narrowSymbol" })
      .formatToParts(0)
      .find((p) => p.type === "currency");
    return part?.value ?? currency;
  } catch {
    return currency;
  }
}

function withCurrency(text: string, negative: boolean, currency: string): string {
  const symbol = currencySymbol(currency);
  const sign = negative ? "-" : "";
  // A symbol goes before the amount; a bare code after it (`12.50 CHF`).
  return symbol !== currency ? `${sign}${symbol}${text}` : `${sign}${text} ${currency}`;
}

/**
 * An amount of money in the price table's currency. Requests cost fractions
 * of a cent, so: `$0` for exactly 0; below 1, four decimals (`$0.0056`), and
 * two significant digits below a tenth of a cent, where four decimals would
 * say too little (`$0.000053`); from 1 on, two decimals (`$1,234.50`). `–`
 * for no amount.
 */
export function money(n: number | null | undefined, currency = "USD"): string {
  if (n == null || !Number.isFinite(n)) return "–";
  if (n === 0) return withCurrency("0", false, currency);
  const abs = Math.abs(n);
  let text: string;
  if (abs >= 1) text = abs.toLocaleString("en-US", { minimumFractionDigits: 2, maximumFractionDigits: 2 });
  else if (abs >= 0.001) text = abs.toFixed(4);
  else text = Number(abs.toPrecision(2)).toFixed(Math.min(20, 1 - Math.floor(Math.log10(abs))));
  return withCurrency(text, n < 0, currency);
}

/** A rate per million tokens: up to four decimals, no trailing zeros beyond two (`$2.50`, `$0.075`). */
export function rate(n: number | null | undefined, currency = "USD"): string {
  if (n == null || !Number.isFinite(n)) return "–";
  let text = n.toFixed(4).replace(/0+$/, "");
  const [int, frac = ""] = text.split(".");
  text = `${int}.${frac.padEnd(2, "0")}`;
  return withCurrency(text.replace(/^-/, ""), n < 0, currency);
}

/** How long until `untilMs`, for a reset: `in 42 min`, `in 5 h 20 min`, `in 3 d 4 h`; `now` once passed. */
export function until(untilMs: number, nowMs: number): string {
  const min = Math.ceil((untilMs - nowMs) / 60_000);
  if (min <= 0) return "now";
  if (min < 60) return `in ${min} min`;
  const h = Math.floor(min / 60);
  if (h < 24) return `in ${h} h${min % 60 ? ` ${min % 60} min` : ""}`;
  const d = Math.floor(h / 24);
  return `in ${d} d${h % 24 ? ` ${h % 24} h` : ""}`;
}
