import { describe, expect, it } from "vitest";
import { compact, countdown, millis } from "./format";

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
});
