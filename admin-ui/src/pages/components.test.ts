import { cleanup, fireEvent, render, screen } from "@testing-library/svelte";
import { afterEach, describe, expect, it, vi } from "vitest";
import Login from "./Login.svelte";
import Keys from "./Keys.svelte";
import Pools from "./Pools.svelte";
import { live, type PoolKey } from "../lib/live.svelte";

function answer(status: number, body: unknown) {
  return new Response(JSON.stringify(body), { status, headers: { "content-type": "application/json" } });
}

afterEach(() => {
  cleanup();
  vi.unstubAllGlobals();
  sessionStorage.clear();
});

describe("Login", () => {
  it("labels its fields and shows the server's refusal as an alert", async () => {
    vi.stubGlobal("fetch", vi.fn(async () => answer(401, { error: { code: "bad_login", message: "wrong username or password" } })));
    render(Login, { reason: "Your session expired. Log in again." });
    expect(screen.getByRole("status").textContent).toContain("session expired");
    await fireEvent.input(screen.getByLabelText("Username"), { target: { value: "admin" } });
    await fireEvent.input(screen.getByLabelText("Password"), { target: { value: "nope-nope" } });
    await fireEvent.submit(screen.getByRole("button", { name: "Log in" }).closest("form")!);
    expect((await screen.findByRole("alert")).textContent).toBe("wrong username or password");
  });
});

describe("Keys", () => {
  it("shows a new key's secret once, then forgets it", async () => {
    const calls: [string, RequestInit | undefined][] = [];
    vi.stubGlobal(
      "fetch",
      vi.fn(async (url: string, init?: RequestInit) => {
        calls.push([url, init]);
        if (init?.method === "POST") {
          return answer(201, { id: "key_1", name: "ci", masked: "fg_abcd…wxyz", secret: "fg_" + "s".repeat(32), permissions: [] });
        }
        return answer(200, []);
      }),
    );
    render(Keys);
    await screen.findByText("No gateway keys yet.");
    await fireEvent.input(screen.getByLabelText("Name"), { target: { value: "ci" } });
    await fireEvent.submit(screen.getByRole("button", { name: "Create key" }).closest("form")!);
    const secret = await screen.findByTestId("secret");
    expect(secret.textContent).toBe("fg_" + "s".repeat(32));
    expect(screen.getByText(/shown this once/)).toBeTruthy();
    const post = calls.find(([, i]) => i?.method === "POST");
    expect(JSON.parse(String(post?.[1]?.body))).toEqual({ name: "ci" });
    await fireEvent.click(screen.getByRole("button", { name: "I have stored it" }));
    expect(document.body.textContent).not.toContain("s".repeat(32));
  });
});

describe("Pools", () => {
  it("shows why a key is disabled and when the provider-disabled one is probed again", async () => {
    const key = (id: string, reason: string, next: number | null): PoolKey => ({
      id, masked: `sk-…${id}`, state: "disabled", until_ms: null, reason, disabled_reason: reason,
      next_probe_at: next, consecutive_failures: 3, in_flight: 0, probing: false, last_error: reason,
      last_error_ms: Date.now(), source: "config", weight: 1,
      totals: { requests: 3, errors: 3, tokens: 0, last_used_ms: null }, models: {},
    });
    live.pools = [{
      pool: { name: "p", strategy: "round_robin", cooldown_scope: "key", keys: 2 } as never,
      keys: [key("prov", "401 unauthorized x3", Date.now() + 125_000), key("adm", "disabled by admin", null)],
    }];
    render(Pools);
    const rows = document.querySelectorAll("tr[data-key]");
    expect(rows[0].textContent).toContain("401 unauthorized x3");
    expect(rows[0].querySelector("[data-testid=next-probe]")?.textContent).toMatch(/^re-probe in 2m 0[45]s$/);
    expect(rows[1].textContent).toContain("disabled by admin");
    expect(rows[1].querySelector("[data-testid=next-probe]")).toBeNull();
    live.pools = [];
  });
});
