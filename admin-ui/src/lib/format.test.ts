import { describe, expect, it } from "vitest";
import { compact, countdown, millis, money, rate, until } from "./format";

describe("format", () => {
  it("counts down in seconds, minutes and hours", () => {
    expect(countdown(10_000, 0)).toBe("10s");
    expect(countdown(10_001, 0)).toBe("11s");
    expect(countdown(245_000, 0)).toBe("4m 05s");
    expect(countdown(7_800_000, 0)).toBe("2h 10m");
    expect(countdown(0, 5_000)).toBe("0s");
  });

  it("writes numbers compactly", () => {
    expect(compact(950)).toBe("950");
    expect(compact(12_345)).toBe("12k");
    expect(compact(1_234)).toBe("1.2k");
    expect(compact(4_100_000)).toBe("4.1M");
    expect(millis(850.4)).toBe("850 ms");
    expect(millis(1250)).toBe("1.25 s");
    expect(millis(null)).toBe("–");
  });

  it("writes costs: $0, four decimals below 1, two significant digits below a tenth of a cent, two decimals from 1", () => {
    expect(money(0)).toBe("$0");
    expect(money(0.0056)).toBe("$0.0056");
    expect(money(0.00559)).toBe("$0.0056");
    expect(money(0.5)).toBe("$0.5000");
    expect(money(0.0000525)).toBe("$0.000053");
    expect(money(0.00012)).toBe("$0.00012");
    expect(money(1)).toBe("$1.00");
    expect(money(12.345)).toBe("$12.35");
    expect(money(1234.5)).toBe("$1,234.50");
    expect(money(-0.25)).toBe("-$0.2500");
    expect(money(null)).toBe("–");
    expect(money(undefined)).toBe("–");
    expect(money(Number.NaN)).toBe("–");
  });

  it("writes money in the price table's currency", () => {
    expect(money(2.5, "EUR")).toBe("€2.50");
    expect(money(0, "EUR")).toBe("€0");
    expect(money(2.5, "CHF")).toBe("2.50 CHF");
    expect(money(2.5, "not-a-currency")).toBe("2.50 not-a-currency");
  });

  it("writes rates per million tokens", () => {
    expect(rate(2.5)).toBe("$2.50");
    expect(rate(10)).toBe("$10.00");
    expect(rate(0.075)).toBe("$0.075");
    expect(rate(0.0375)).toBe("$0.0375");
    expect(rate(0)).toBe("$0.00");
    expect(rate(null)).toBe("–");
  });

  it("says how long until a reset", () => {
    const min = 60_000;
    expect(until(42 * min, 0)).toBe("in 42 min");
    expect(until(30_000, 0)).toBe("in 1 min");
    expect(until(5 * 60 * min + 20 * min, 0)).toBe("in 5 h 20 min");
    expect(until(2 * 60 * min, 0)).toBe("in 2 h");
    expect(until((3 * 24 + 4) * 60 * min, 0)).toBe("in 3 d 4 h");
    expect(until(0, 1)).toBe("now");
  });
});
