/**
 * The price table's currency (`GET /api/pricing`), read once per session and
 * shared by every page that shows money. USD until it is known.
 */
import { api } from "./api";

/** One rule of the price table, in the order tried; rates per million tokens. */
export interface PriceRule {
  model?: string | null;
  upstream?: string | null;
  provider?: string | null;
  effective?: string | null;
  input: number;
  output: number;
  cached_input?: number | null;
  cache_write?: number | null;
  reasoning?: number | null;
  long_context?: ({ above: number } & Record<string, number | null | undefined>) | null;
  version: string;
}

export interface PriceTable {
  currency: string;
  rules: PriceRule[];
}

export const pricing = $state({ currency: "USD" });
let loaded: Promise<void> | null = null;

/** Learn the currency (once; a failed read is tried again next time). */
export function loadCurrency(): Promise<void> {
  loaded ??= api<PriceTable>("/api/pricing").then(
    (t) => {
      pricing.currency = t.currency || "USD";
    },
    () => {
      loaded = null;
    },
  );
  return loaded;
}
