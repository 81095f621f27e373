import { describe, expect, it } from "vitest";
import { annotate, routeName } from "./lines";

describe("route YAML helpers", () => {
  it("puts each problem at its line", () => {
    const rows = annotate("routes:\n  - name: r\n    upstream: x", [
      { line: 2, message: "unknown upstream" },
      { line: 2, message: "second" },
    ]);
    expect(rows.map((r) => r.n)).toEqual([1, 2, 3]);
    expect(rows[1].problems).toEqual(["unknown upstream", "second"]);
    expect(rows[0].problems).toEqual([]);
  });

  it("reads the route's name", () => {
    expect(routeName("routes:\n  - name: team-ml\n    match: {}")).toBe("team-ml");
    expect(routeName("routes:\n  - name: 'quoted'")).toBe("quoted");
    expect(routeName("routes: []")).toBeNull();
  });
});
