import { cleanup, fireEvent, render, screen } from "@testing-library/svelte";
import { afterEach, describe, expect, it, vi } from "vitest";
import Login from "./Login.svelte";
import Keys from "./Keys.svelte";
import Pools from "./Pools.svelte";
import Logs from "./Logs.svelte";
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

describe("Keys' budgets", () => {
  it("sends a budget with a new key", async () => {
    const posts: unknown[] = [];
    vi.stubGlobal(
      "fetch",
      vi.fn(async (url: string, init?: RequestInit) => {
        if (init?.method === "POST") {
          posts.push(JSON.parse(String(init.body)));
          return answer(201, { id: "key_1", name: "ci", masked: "fg_…", secret: "fg_" + "t".repeat(32), permissions: [] });
        }
        return answer(200, url.startsWith("/api/pricing") ? { currency: "USD", rules: [] } : []);
      }),
    );
    render(Keys);
    await screen.findByText("No gateway keys yet.");
    await fireEvent.input(screen.getByLabelText("Name"), { target: { value: "ci" } });
    await fireEvent.input(screen.getByLabelText("Budget (USD)"), { target: { value: "2.5" } });
    await fireEvent.change(screen.getByLabelText("Budget period"), { target: { value: "week" } });
    await fireEvent.submit(screen.getByRole("button", { name: "Create key" }).closest("form")!);
    await screen.findByTestId("secret");
    expect(posts).toEqual([{ name: "ci", budget: { amount: 2.5, period: "week" } }]);
  });

  it("shows a key's budget bar from its usage, and the owner's", async () => {
    const key = {
      id: "key_b", name: "budgeted", owner: "bob", owner_id: "u1", masked: "fg_…", permissions: [], expires_at: null, enabled: true,
      created_at: 1, revoked_at: null, rpm: null, tpm: null, token_quota: null, quota_period: null, budget: { amount: 10, period: "month" },
    };
    const usage = {
      requests: 3, errors: 0, prompt_tokens: 30, completion_tokens: 9, cost: 8.5, window_s: 86400,
      budget: { amount: 10, period: "month", spent: 8.5, resets_at: Date.now() + 3 * 86_400_000 },
      owner_budget: { amount: 100, period: "total", spent: 8.5, resets_at: null },
    };
    vi.stubGlobal(
      "fetch",
      vi.fn(async (url: string) => answer(200, url === "/api/keys" ? [key] : url.startsWith("/api/keys/key_b/usage") ? usage : { currency: "USD", rules: [] })),
    );
    render(Keys);
    const bars = await screen.findAllByTestId("budget");
    expect(bars).toHaveLength(2);
    expect(bars[0].dataset.level).toBe("warn");
    expect(bars[0].textContent).toContain("$8.50 of $10.00 per month");
    expect(bars[0].textContent).toContain("near the limit");
    expect(bars[0].textContent).toMatch(/resets in [23] d/);
    expect(bars[1].textContent).toContain("Budget of bob (all their keys)");
    expect(bars[1].textContent).toContain("never resets");
    expect(screen.getByTestId("key-cost").textContent).toBe("$8.50");
  });
});

describe("Logs", () => {
  it("shows each request's cost and flags an unpriced one", async () => {
    const row = (id: number, model: string, cost: number | null, tokens: number | null) => ({
      id, request_id: `req-${id}`, ts_ms: 1, key_id: null, owner: null, route: "chat", upstream: "oai", endpoint: null,
      upstream_key_id: null, method: "POST", path: "/v1/chat/completions", status: 200, model, stream: false, ttfb_ms: 5,
      duration_ms: 9, request_bytes: 1, response_bytes: 1, chunks: 0, prompt_tokens: tokens, completion_tokens: tokens,
      cost, price_version: cost == null ? null : "builtin/2026-11-20", cache_read_tokens: 4, cache_write_tokens: null,
      reasoning_tokens: 2, retries: 0, attempts: null, error: null, client_ip: null, user_agent: null, request_headers: null,
      response_headers: null, request_body: null, response_body: null,
    });
    vi.stubGlobal(
      "fetch",
      vi.fn(async (url: string) =>
        answer(200, url.startsWith("/api/pricing") ? { currency: "USD", rules: [] } : { items: [row(1, "gpt-4o", 0.0056, 10), row(2, "mystery", null, 10), row(3, "gpt-4o", null, null)], next_cursor: null }),
      ),
    );
    render(Logs);
    const priced = (await screen.findByText("$0.0056")).closest("tr")!;
    expect(priced.getAttribute("data-request-id")).toBe("req-1");
    const unpriced = document.querySelector('tr[data-request-id="req-2"] [data-testid=unpriced]')!;
    expect(unpriced.textContent).toBe("unpriced");
    expect(unpriced.getAttribute("title")).toMatch(/no price for this model/i);
    expect(document.querySelector('tr[data-request-id="req-3"] [data-testid=unpriced]')).toBeNull();
    await fireEvent.click(priced.querySelector("button")!);
    const drawer = screen.getByRole("dialog");
    expect(screen.getByTestId("detail-cost").textContent?.trim()).toBe("$0.0056");
    expect(screen.getByTestId("price-version").textContent).toBe("builtin/2026-11-20");
    expect(drawer.textContent).toContain("Cache read · write");
    expect(drawer.textContent).toContain("4 · –");
    expect(drawer.textContent).toContain("Reasoning tokens");
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
