import { cleanup, fireEvent, render, screen } from "@testing-library/svelte";
import { afterEach, describe, expect, it, vi } from "vitest";
import Login from "./Login.svelte";
import Keys from "./Keys.svelte";

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
