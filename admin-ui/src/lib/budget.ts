/**
 * Budgets in money (docs/spend.md): the shapes the admin API uses, how full
 * one is, and the words shown beside its bar (so that its colour is never
 * the only sign of its state).
 */
import { until } from "./format";

export const PERIODS = ["day", "week", "month", "total"] as const;
export type Period = (typeof PERIODS)[number];

/** A budget as set on a key or in a user's ceilings. */
export interface Budget {
  amount: number;
  period: Period;
}

/** A budget with its use in the current period (`GET /api/keys/{id}/usage`). */
export interface BudgetUse extends Budget {
  spent: number;
  /** Unix ms when the period ends; null for `total`, which never resets. */
  resets_at: number | null;
}

/** ok below 80 %, warn from 80 %, over from 100 %. */
export type Level = "ok" | "warn" | "over";

/** How full a budget is: its percent (uncapped) and level. A zero budget is full. */
export function fill(spent: number, amount: number): { percent: number; level: Level } {
  const percent = amount > 0 ? (Math.max(0, spent) / amount) * 100 : 100;
  return { percent, level: percent >= 100 ? "over" : percent >= 80 ? "warn" : "ok" };
}

/** A percent for people: `0 %`, `<1 %`, then whole percents rounded down (99.7 is not yet 100). */
export function percentText(percent: number): string {
  if (percent <= 0) return "0 %";
  if (percent < 1) return "<1 %";
  return `${Math.floor(percent)} %`;
}

/** What a level means, in words: none for ok. */
export function levelText(level: Level): string {
  return level === "over" ? "over budget" : level === "warn" ? "near the limit" : "";
}

/** `per day`, `per week`, `per month`, `in total`. */
export function periodText(period: string): string {
  return period === "total" ? "in total" : `per ${period}`;
}

/** `resets in 3 d 4 h`, or `never resets` for a total budget. */
export function resetText(resetsAt: number | null, nowMs: number): string {
  return resetsAt == null ? "never resets" : `resets ${until(resetsAt, nowMs)}`;
}

/**
 * A budget from a form's amount and period: `null` when the amount is empty
 * (no budget), an error message when it is not a number from 0 up.
 */
export function budgetFrom(amount: string | number | null | undefined, period: string): Budget | null | string {
  const text = String(amount ?? "").trim();
  if (!text) return null;
  const n = Number(text);
  if (!Number.isFinite(n) || n < 0) return "The budget must be an amount from 0 up.";
  if (!(PERIODS as readonly string[]).includes(period)) return `The budget period must be one of ${PERIODS.join(", ")}.`;
  return { amount: n, period: period as Period };
}
