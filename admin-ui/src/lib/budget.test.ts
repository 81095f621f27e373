import { cleanup, render } from "@testing-library/svelte";
import { afterEach, describe, expect, it } from "vitest";
import { budgetFrom, fill, levelText, percentText, periodText, resetText } from "./budget";
import BudgetBar from "./BudgetBar.svelte";

afterEach(cleanup);

describe("budget logic", () => {
  it("is ok below 80 %, warn from 80 %, over from 100 %", () => {
    expect(fill(0, 10)).toEqual({ percent: 0, level: "ok" });
    expect(fill(7.99, 10).level).toBe("ok");
    expect(fill(8, 10)).toEqual({ percent: 80, level: "warn" });
    expect(fill(9.99, 10).level).toBe("warn");
    expect(fill(10, 10)).toEqual({ percent: 100, level: "over" });
    expect(fill(12, 10)).toEqual({ percent: 120, level: "over" });
    // A zero budget allows nothing: it is full.
    expect(fill(0, 0).level).toBe("over");
    expect(fill(-1, 10).percent).toBe(0);
  });

  it("says the percent without claiming 100 % too early", () => {
    expect(percentText(0)).toBe("0 %");
    expect(percentText(0.0005)).toBe("<1 %");
    expect(percentText(42.9)).toBe("42 %");
    expect(percentText(99.7)).toBe("99 %");
    expect(percentText(120)).toBe("120 %");
  });

  it("puts the state and the reset in words", () => {
    expect(levelText("ok")).toBe("");
    expect(levelText("warn")).toBe("near the limit");
    expect(levelText("over")).toBe("over budget");
    expect(periodText("month")).toBe("per month");
    expect(periodText("total")).toBe("in total");
    expect(resetText(null, 0)).toBe("never resets");
    expect(resetText(90 * 60_000, 0)).toBe("resets in 1 h 30 min");
  });

  it("reads a budget from a form", () => {
    expect(budgetFrom("", "month")).toBeNull();
    expect(budgetFrom(null, "month")).toBeNull();
    expect(budgetFrom(" 25 ", "week")).toEqual({ amount: 25, period: "week" });
    expect(budgetFrom(0.5, "total")).toEqual({ amount: 0.5, period: "total" });
    expect(budgetFrom("0", "day")).toEqual({ amount: 0, period: "day" });
    expect(budgetFrom("-1", "day")).toMatch(/from 0 up/);
    expect(budgetFrom("abc", "day")).toMatch(/from 0 up/);
    expect(budgetFrom("5", "year")).toMatch(/period/);
  });
});

describe("BudgetBar", () => {
  const hour = 3_600_000;

  it("shows spent of amount, percent, period and reset, with a meter", () => {
    const { getByTestId, getByRole } = render(BudgetBar, {
      use: { amount: 5, period: "month", spent: 1.25, resets_at: 50 * hour },
      label: "Key budget",
      now: 0,
    });
    const bar = getByTestId("budget");
    expect(bar.dataset.level).toBe("ok");
    expect(getByTestId("budget-spent").textContent).toBe("$1.25");
    expect(bar.textContent).toContain("of $5.00");
    expect(bar.textContent).toContain("per month");
    expect(getByTestId("budget-percent").textContent).toBe("25 %");
    expect(getByTestId("budget-reset").textContent).toBe("resets in 2 d 2 h");
    const meter = getByRole("meter", { name: "Key budget" });
    expect(meter.getAttribute("aria-valuenow")).toBe("25");
    expect(meter.getAttribute("aria-valuetext")).toBe("$1.25 of $5.00 per month, 25 %");
    expect((meter.firstElementChild as HTMLElement).style.width).toBe("25%");
  });

  it("says near the limit and over budget in words, not only in colour", () => {
    const warn = render(BudgetBar, { use: { amount: 10, period: "day", spent: 8.5, resets_at: hour }, label: "k", now: 0 });
    expect(warn.getByTestId("budget").dataset.level).toBe("warn");
    expect(warn.getByTestId("budget").textContent).toContain("near the limit");
    cleanup();
    const over = render(BudgetBar, { use: { amount: 1, period: "total", spent: 1.5, resets_at: null }, label: "k", now: 0 });
    const bar = over.getByTestId("budget");
    expect(bar.dataset.level).toBe("over");
    expect(bar.textContent).toContain("over budget");
    expect(over.getByTestId("budget-percent").textContent).toBe("150 %");
    expect(over.getByTestId("budget-reset").textContent).toBe("never resets");
    expect(over.getByRole("meter").getAttribute("aria-valuenow")).toBe("100");
    expect((over.getByRole("meter").firstElementChild as HTMLElement).style.width).toBe("100%");
  });
});
