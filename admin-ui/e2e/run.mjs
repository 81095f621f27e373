// End-to-end: the real `fastgate` binary (its embedded UI) against a mock
// OpenAI upstream, driven in real headless Chromium (Debian's package; a
// browser download cannot work here) with playwright-core.
//
//   node e2e/run.mjs            (FASTGATE_BIN, CHROMIUM override the paths)
//
// Screenshots of each page at desktop and phone width go to e2e/artifacts/.
import { spawn } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, writeFileSync } from "node:fs";
import { createServer } from "node:http";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const here = dirname(fileURLToPath(import.meta.url));
const root = resolve(here, "../..");
const bin = process.env.FASTGATE_BIN ?? join(process.env.CARGO_TARGET_DIR ?? join(root, "target"), "debug/fastgate");
const browserPath = process.env.CHROMIUM ?? "/usr/bin/chromium";
const artifacts = join(here, "artifacts");
for (const [what, path, fix] of [
  ["Chromium", browserPath, "apt-get install chromium"],
  ["the fastgate binary", bin, "cargo build --bin fastgate"],
]) {
  if (!existsSync(path)) {
    console.error(`${what} is not at ${path}: ${fix}`);
    process.exit(1);
  }
}
mkdirSync(artifacts, { recursive: true });

const LIMITED = "sk-e2e-limited-key-0001";
const GOOD = "sk-e2e-good-key-00002";
const EXTRA = "sk-e2e-extra-key-0003";
const PASSWORD = "e2e-admin-password";

let failures = 0;
let passed = 0;
async function step(name, f) {
  const started = Date.now();
  try {
    await f();
    passed++;
    console.log(`ok   ${name} (${Date.now() - started} ms)`);
  } catch (e) {
    failures++;
    console.log(`FAIL ${name}: ${e.stack ?? e}`);
  }
}
function assert(cond, message) {
  if (!cond) throw new Error(message);
}

// A mock OpenAI upstream: chat completions with usage; 429 with
// Retry-After for the limited key while `limit` is on.
const mock = { limit: false, seen: 0 };
const upstream = createServer((req, res) => {
  let body = "";
  req.on("data", (c) => (body += c));
  req.on("end", () => {
    mock.seen++;
    const auth = req.headers.authorization ?? "";
    if (mock.limit && auth === `Bearer ${LIMITED}`) {
      res.writeHead(429, { "content-type": "application/json", "retry-after": "2" });
      res.end(JSON.stringify({ error: { message: "Rate limit reached", type: "requests", code: "rate_limit_exceeded" } }));
      return;
    }
    res.writeHead(200, { "content-type": "application/json", "x-ratelimit-remaining-requests": "999" });
    res.end(
      JSON.stringify({
        id: "chatcmpl-e2e",
        object: "chat.completion",
        created: 1,
        model: "gpt-4o",
        choices: [{ index: 0, message: { role: "assistant", content: "hello" }, finish_reason: "stop" }],
        usage: { prompt_tokens: 9, completion_tokens: 3, total_tokens: 12 },
      }),
    );
  });
});
await new Promise((ok) => upstream.listen(0, "127.0.0.1", ok));
const upstreamUrl = `http://127.0.0.1:${upstream.address().port}`;

async function freePort() {
  const s = createServer();
  await new Promise((ok) => s.listen(0, "127.0.0.1", ok));
  const port = s.address().port;
  await new Promise((ok) => s.close(ok));
  return port;
}

const dir = mkdtempSync(join(tmpdir(), "fastgate-ui-e2e-"));
mkdirSync(join(dir, "routes.d"));
writeFileSync(
  join(dir, "routes.d", "chat.yaml"),
  "routes:\n  - { name: chat, match: { path: /v1/chat/completions }, format: openai, auth: none, upstream: oai, retries: 2 }\n" +
    "  - { name: keyed, match: { path: /keyed/v1/chat/completions }, format: openai, upstream: oai, transform: { strip_prefix: /keyed } }\n",
);
const [port, adminPort] = [await freePort(), await freePort()];
writeFileSync(
  join(dir, "fastgate.yaml"),
  `server: { listen: 127.0.0.1:${port}, threads: 1, grace_period: 2s }
admin: { listen: 127.0.0.1:${adminPort} }
database: { path: ${join(dir, "fg.db")} }
routes_dir: ${join(dir, "routes.d")}
upstreams:
  oai: { provider: openai, endpoints: ['${upstreamUrl}'], key_pool: openai }
secrets: { master_key: e2e-master-key-e2e-master-key-e2e-master-key }
key_pools:
  openai: { keys: [${GOOD}], strategy: round_robin }
`,
);
const log = join(dir, "fastgate.log");
const gateway = spawn(bin, ["serve", "-c", join(dir, "fastgate.yaml")], {
  env: { ...process.env, FASTGATE_ADMIN_PASSWORD: PASSWORD, FASTGATE_LOG: "info" },
  stdio: ["ignore", "ignore", "pipe"],
});
let gatewayLog = "";
gateway.stderr.on("data", (d) => (gatewayLog += d));
const admin = `http://127.0.0.1:${adminPort}`;
for (let i = 0; ; i++) {
  try {
    if ((await fetch(`${admin}/health`)).ok) break;
  } catch {}
  if (i > 200) throw new Error(`fastgate did not start:\n${gatewayLog}`);
  await new Promise((ok) => setTimeout(ok, 50));
}

async function chat(n) {
  for (let i = 0; i < n; i++) {
    const r = await fetch(`http://127.0.0.1:${port}/v1/chat/completions`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ model: "gpt-4o", messages: [{ role: "user", content: "hi" }] }),
    });
    assert(r.status === 200, `data plane answered ${r.status}`);
  }
}

const browser = await chromium.launch({
  executablePath: browserPath,
  headless: true,
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
});
const desktop = await browser.newContext({ viewport: { width: 1280, height: 800 } });
const page = await desktop.newPage();
const consoleErrors = [];
page.on("console", (m) => m.type() === "error" && consoleErrors.push(m.text()));
page.on("pageerror", (e) => consoleErrors.push(String(e)));

async function shoot(name) {
  await page.screenshot({ path: join(artifacts, `${name}-desktop.png`), fullPage: true });
  const phone = await browser.newContext({ viewport: { width: 390, height: 844 }, deviceScaleFactor: 2 });
  const p = await phone.newPage();
  await p.addInitScript((s) => sessionStorage.setItem("fastgate.session", s), await page.evaluate(() => sessionStorage.getItem("fastgate.session") ?? "null"));
  await p.goto(page.url());
  await p.waitForTimeout(1200);
  const wide = await p.evaluate(() => document.documentElement.scrollWidth > window.innerWidth + 1);
  await p.screenshot({ path: join(artifacts, `${name}-phone.png`), fullPage: true });
  await phone.close();
  assert(!wide, `${name}: the page scrolls sideways at 390 px`);
}

await step("a wrong password is refused with a readable message", async () => {
  await page.goto(admin);
  await page.getByRole("button", { name: "Log in" }).waitFor();
  await page.screenshot({ path: join(artifacts, "login-desktop.png") });
  const phone = await browser.newContext({ viewport: { width: 390, height: 844 }, deviceScaleFactor: 2 });
  const p = await phone.newPage();
  await p.goto(admin);
  await p.getByRole("button", { name: "Log in" }).waitFor();
  await p.screenshot({ path: join(artifacts, "login-phone.png") });
  await phone.close();
  await page.getByLabel("Username").fill("admin");
  await page.getByLabel("Password").fill("not-the-password");
  await page.getByRole("button", { name: "Log in" }).click();
  const alert = page.getByRole("alert");
  await alert.waitFor();
  assert((await alert.textContent()).toLowerCase().includes("wrong username or password"), `message: ${await alert.textContent()}`);
  // The browser logs the refused login's 401 itself: expected here.
  consoleErrors.length = 0;
});

await step("log in and see the live dashboard", async () => {
  await page.getByLabel("Password").fill(PASSWORD);
  await page.getByRole("button", { name: "Log in" }).click();
  await page.getByRole("heading", { name: "Dashboard" }).waitFor();
  // Traffic while the dashboard is open: the live counters move without a reload.
  let traffic = true;
  const load = (async () => {
    while (traffic) {
      await chat(3);
      await new Promise((ok) => setTimeout(ok, 100));
    }
  })();
  await page.waitForFunction(() => {
    const tile = [...document.querySelectorAll(".tile")].find((t) => t.textContent.includes("Requests/s"));
    const v = Number(tile?.querySelector("strong")?.textContent);
    return v > 0;
  }, null, { timeout: 10_000 });
  // A reload keeps the session (session storage) and loads the last hour.
  await page.reload();
  await page.getByRole("region", { name: "Last 1 h" }).waitFor({ timeout: 10_000 });
  await page.getByRole("region", { name: "Top routes" }).getByText("chat").waitFor();
  await page.getByRole("button", { name: "24 h" }).click();
  await page.getByRole("region", { name: "Last 24 h" }).waitFor({ timeout: 10_000 });
  await page.getByRole("button", { name: "1 h", exact: true }).click();
  await page.getByRole("region", { name: "Last 1 h" }).waitFor({ timeout: 10_000 });
  await page.locator(".chart canvas").first().waitFor({ timeout: 10_000 });
  // The shipped price table prices gpt-4o: the window's cost is in dollars, and above nothing.
  const cost = (await page.getByTestId("cost-total").textContent()).trim();
  assert(/^\$0\.\d+$/.test(cost), `the cost tile: ${cost}`);
  await page.getByRole("region", { name: "Top routes" }).getByText(/^\$0\.\d+$/).first().waitFor();
  await page.waitForTimeout(4000);
  traffic = false;
  await load;
  await page.screenshot({ path: join(artifacts, "dashboard-desktop.png") });
  await shoot("dashboard");
});

await step("bulk-add pool keys; one that 429s turns cooling with a countdown and back, live", async () => {
  await page.getByRole("link", { name: "Key pools" }).click();
  await page.getByRole("heading", { name: "openai" }).waitFor();
  // Two keys pasted one per line (and a duplicate of the configured one).
  await page.getByLabel("Add keys to openai, one per line").fill(`${LIMITED}\n${EXTRA}\n${GOOD}\n`);
  await page.getByRole("button", { name: "Add and test" }).click();
  await page
    .getByText("2 added, 1 already in the pool.")
    .waitFor({ timeout: 10_000 })
    .catch(async (e) => {
      throw new Error(`${e.message}\npage says: ${(await page.locator(".error, .notice").allTextContents()).join(" | ")}`);
    });
  const results = page.getByRole("list", { name: "Test results" });
  assert((await results.getByText("answered 200").count()) === 2, `per-key test results: ${await results.textContent()}`);
  const badges = page.locator('[data-testid="state"]');
  await badges.nth(2).waitFor({ timeout: 5_000 });
  const limitedRow = page.locator("tr", { hasText: "sk-e2e…0001" });
  assert((await limitedRow.locator('[data-testid="state"]').textContent()).trim() === "active", "starts active");
  mock.limit = true;
  await chat(4);
  await page.waitForFunction(
    () => [...document.querySelectorAll("tr")].some((r) => r.textContent.includes("sk-e2e…0001") && /cooling \d+s/.test(r.querySelector('[data-testid="state"]')?.textContent ?? "")),
    null,
    { timeout: 10_000 },
  );
  await shoot("pools-cooling");
  mock.limit = false;
  // After the 2 s cooldown a request probes the key and it is active again.
  const until = Date.now() + 15_000;
  for (;;) {
    await chat(1);
    const state = (await limitedRow.locator('[data-testid="state"]').textContent()).trim();
    if (state === "active") break;
    assert(Date.now() < until, `still ${state}`);
    await page.waitForTimeout(300);
  }
  await shoot("pools");
});

await step("create a gateway key, use it, and find the request in the logs with its timings", async () => {
  await page.getByRole("link", { name: "Gateway keys" }).click();
  await page.getByRole("heading", { name: "Gateway keys" }).waitFor();
  await page.getByLabel("Name", { exact: true }).fill("e2e-app");
  await page.getByRole("button", { name: "Create key" }).click();
  const secret = (await page.getByTestId("secret").textContent()).trim();
  assert(/^fg_[A-Za-z0-9]{32}$/.test(secret), `secret: ${secret}`);
  assert((await page.getByText("shown this once").count()) === 1, "the one-time warning");
  await page.screenshot({ path: join(artifacts, "keys-secret-desktop.png"), fullPage: true });
  const r = await fetch(`http://127.0.0.1:${port}/keyed/v1/chat/completions`, {
    method: "POST",
    headers: { "content-type": "application/json", authorization: `Bearer ${secret}` },
    body: JSON.stringify({ model: "gpt-4o", messages: [{ role: "user", content: "hi" }] }),
  });
  assert(r.status === 200, `the new key on the data plane: ${r.status}`);
  const requestId = r.headers.get("x-request-id");
  await page.getByRole("button", { name: "I have stored it" }).click();
  assert(!(await page.content()).includes(secret), "the secret is still on the page");
  await page.locator("tr", { hasText: "e2e-app" }).waitFor();
  // Its usage: the request just made, in numbers and a chart.
  await page.locator("tr", { hasText: "e2e-app" }).getByRole("button", { name: "Usage" }).click();
  await page.getByRole("region", { name: "Usage of e2e-app" }).locator("canvas").first().waitFor({ timeout: 30_000 });
  assert((await page.locator("tr", { hasText: "e2e-app" }).textContent()).includes("1 req"), "usage counts the request");
  await shoot("keys");

  await page.getByRole("link", { name: "Logs" }).click();
  await page.getByLabel("Route").fill("keyed");
  await page.getByRole("button", { name: "Apply" }).click();
  const row = page.locator(`tr[data-request-id="${requestId}"]`);
  await row.waitFor({ timeout: 10_000 });
  // Priced by the shipped table: a cost in dollars, no "unpriced" flag.
  const cell = (await row.getByTestId("cost").textContent()).trim();
  assert(/^\$0\.\d+$/.test(cell), `the cost cell: ${cell}`);
  assert((await page.getByTestId("unpriced").count()) === 0, "a priced request flagged unpriced");
  await row.getByRole("button").click();
  const drawer = page.getByRole("dialog");
  await drawer.waitFor();
  assert((await drawer.getByTestId("detail-cost").textContent()).trim() === cell, "the drawer's cost");
  const version = (await drawer.getByTestId("price-version").textContent()).trim();
  assert(/^builtin\//.test(version), `the price version: ${version}`);
  const ttfb = (await drawer.getByTestId("ttfb").textContent()).trim();
  assert(/ms$|s$/.test(ttfb) && ttfb !== "–", `TTFB shown: ${ttfb}`);
  assert((await drawer.textContent()).includes(requestId), "the drawer names the request");
  await page.screenshot({ path: join(artifacts, "logs-detail-desktop.png") });
  assert(await page.evaluate(() => document.activeElement?.getAttribute("role") === "dialog"), "the drawer takes focus");
  await page.keyboard.press("Escape");
  await drawer.waitFor({ state: "detached" });
  assert(
    await page.evaluate((id) => document.activeElement?.closest("tr")?.getAttribute("data-request-id") === id, requestId),
    "focus goes back to the row that opened the drawer",
  );
  await shoot("logs");
});

await step("a key with a budget: its bar shows what it spent; over budget it is refused", async () => {
  const token = await page.evaluate(() => JSON.parse(sessionStorage.getItem("fastgate.session")).token);
  const made = await fetch(`${admin}/api/keys`, {
    method: "POST",
    headers: { "content-type": "application/json", authorization: `Bearer ${token}` },
    body: JSON.stringify({ name: "e2e-budget", budget: { amount: 2, period: "month" } }),
  });
  assert(made.status === 201, `creating a key with a budget: ${made.status}`);
  const key = await made.json();
  assert(key.budget?.amount === 2 && key.budget?.period === "month", `the key's budget: ${JSON.stringify(key.budget)}`);
  const send = () =>
    fetch(`http://127.0.0.1:${port}/keyed/v1/chat/completions`, {
      method: "POST",
      headers: { "content-type": "application/json", authorization: `Bearer ${key.secret}` },
      body: JSON.stringify({ model: "gpt-4o", max_tokens: 16, messages: [{ role: "user", content: "hi" }] }),
    });
  const r = await send();
  assert(r.status === 200, `a request within the budget: ${r.status}`);
  // The audit writer batches rows: wait until the spend is counted.
  for (const until = Date.now() + 10_000; ; ) {
    const usage = await (await fetch(`${admin}/api/keys/${key.id}/usage?window=24h`, { headers: { authorization: `Bearer ${token}` } })).json();
    if (usage.budget?.spent > 0) break;
    assert(Date.now() < until, `the API does not count the spend: ${JSON.stringify(usage.budget)}`);
    await new Promise((ok) => setTimeout(ok, 200));
  }

  await page.getByRole("link", { name: "Dashboard" }).click();
  await page.getByRole("link", { name: "Gateway keys" }).click();
  const row = page.locator(`tr[data-key="${key.id}"]`);
  const bar = row.getByTestId("budget");
  await bar.waitFor({ timeout: 10_000 });
  const spent = (await bar.getByTestId("budget-spent").textContent()).trim();
  assert(/^\$0\.\d+$/.test(spent) && spent !== "$0", `spent: ${spent}`);
  const text = await bar.textContent();
  assert(text.includes("of $2.00 per month"), `the bar: ${text}`);
  assert((await bar.getByTestId("budget-percent").textContent()).trim() === "<1 %", "the percent");
  assert(/^resets in \d+ (d|h|min)/.test((await bar.getByTestId("budget-reset").textContent()).trim()), "when it resets");
  assert((await bar.getAttribute("data-level")) === "ok", "well below the limit");
  assert((await row.getByRole("meter").getAttribute("aria-valuetext")).startsWith(spent), "the meter says it in words");
  await shoot("keys-budget");

  // Edited down below what it spent, on the keys page: over budget, in words; the data plane refuses it.
  await row.getByRole("button", { name: "Budget" }).click();
  const form = page.getByRole("form", { name: "Budget of e2e-budget" });
  await form.getByLabel("Amount (USD)").fill("0.00001");
  await form.getByLabel("Period").selectOption("total");
  await form.getByRole("button", { name: "Save budget" }).click();
  await page.getByText("Budget saved.").waitFor();
  await row.locator('[data-testid="budget"][data-level="over"]').waitFor({ timeout: 10_000 });
  const over = await row.getByTestId("budget").textContent();
  assert(over.includes("over budget") && over.includes("never resets"), `over budget: ${over}`);
  assert((await send()).status === 429, "a key over its budget still serves");
  await page.screenshot({ path: join(artifacts, "keys-over-budget-desktop.png"), fullPage: true });

  // Removed: no bar.
  await row.getByRole("button", { name: "Budget" }).click();
  await page.getByRole("button", { name: "Remove budget" }).click();
  await page.getByText("Budget removed.").waitFor();
  await row.getByTestId("budget").waitFor({ state: "detached" });
  assert((await send()).status === 200, "a key without a budget is refused");
});

await step("a user account sees neither another user's keys nor their requests", async () => {
  // Created on the users page.
  await page.getByRole("link", { name: "Users" }).click();
  await page.getByRole("heading", { name: "New user" }).waitFor();
  await page.getByLabel("Username").fill("bob");
  await page.getByLabel("Password").fill("bob-password-123");
  await page.getByLabel("Role").selectOption("user");
  await page.getByRole("button", { name: "Create user" }).click();
  await page.getByText("User created.").waitFor();
  await page.locator("tr", { hasText: "bob" }).first().waitFor();
  // A budget in bob's ceilings, shared by all his keys.
  await page.locator("tr", { hasText: "bob" }).getByRole("button", { name: "Ceilings" }).click();
  await page.getByLabel("Budget (USD)").fill("5");
  await page.getByLabel("Budget period").selectOption("week");
  await page.getByRole("button", { name: "Save ceilings" }).click();
  await page.getByText("Ceilings saved.").waitFor();
  await page.locator("tr", { hasText: "bob" }).getByTestId("ceilings").getByText("$5.00 per week").waitFor();
  await shoot("users");
  const ctx = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  const bob = await ctx.newPage();
  bob.on("pageerror", (e) => consoleErrors.push(String(e)));
  await bob.goto(admin);
  await bob.getByLabel("Username").fill("bob");
  await bob.getByLabel("Password").fill("bob-password-123");
  await bob.getByRole("button", { name: "Log in" }).click();
  await bob.getByRole("heading", { name: "Gateway keys" }).waitFor();
  await bob.getByText("No gateway keys yet.").waitFor();
  assert(!(await bob.content()).includes("e2e-app"), "bob sees the admin's key");
  assert((await bob.getByRole("link", { name: "Key pools" }).count()) === 0, "bob is offered the key pools");
  await bob.getByRole("link", { name: "Logs" }).click();
  await bob.getByText("No requests match.").waitFor();
  await ctx.close();
});

await step("routes: turn one off (the data plane answers 404), a YAML edit with a typo marked at its line, the tester", async () => {
  const post = () =>
    fetch(`http://127.0.0.1:${port}/v1/chat/completions`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ model: "gpt-4o", messages: [] }),
    });
  await page.getByRole("link", { name: "Routes" }).click();
  const chatRow = page.locator('tr[data-route="chat"]');
  await chatRow.getByRole("button", { name: "Turn off" }).click();
  await page.getByText("Route chat turned off.").waitFor();
  assert((await post()).status === 404, "a route turned off in the UI still serves");
  await chatRow.getByRole("button", { name: "Turn on" }).click();
  await page.getByText("Route chat turned on.").waitFor();
  assert((await post()).status === 200, "turned back on");

  // As a form: the priority changes, the rest of the route stays.
  await page.locator('tr[data-route="keyed"]').getByRole("button", { name: "Edit" }).click();
  await page.getByLabel("Priority").fill("90");
  await page.getByRole("button", { name: "Save" }).click();
  await page.getByText("Route keyed saved").waitFor();
  await page.locator('tr[data-route="keyed"]', { hasText: "priority 90" }).waitFor();

  await page.locator('tr[data-route="keyed"]').getByRole("button", { name: "YAML" }).click();
  const editor = page.getByLabel("Route", { exact: true });
  await editor.waitFor();
  const text = await editor.inputValue();
  assert(text.includes("name: keyed"), text);
  // A misspelt key at the route's own indentation.
  const indent = /^( *)retries:/m.exec(text)[1];
  const broken = `${text.trimEnd()}\n${indent}retires: 2\n`;
  const typoLine = broken.trimEnd().split("\n").length;
  await editor.fill(broken);
  await page.getByRole("button", { name: "Save" }).click();
  const marked = page.locator(".listing li.bad");
  await marked.first().waitFor();
  assert((await marked.first().getAttribute("data-line")) === String(typoLine), `marked at line ${await marked.first().getAttribute("data-line")}, not ${typoLine}`);
  assert((await marked.first().textContent()).includes("retires"), await marked.first().textContent());
  await shoot("routes-yaml-error");
  // The browser logs the refused save's 400 itself: expected here.
  consoleErrors.length = 0;
  await page.getByRole("button", { name: "Cancel" }).click();

  await page.getByLabel("Path", { exact: true }).fill("/keyed/v1/chat/completions");
  await page.getByRole("button", { name: "Which route?" }).click();
  await page.getByText("keyed takes it.").waitFor();
  await shoot("routes");
});

await step("settings show the effective config without secrets and reload it", async () => {
  await page.getByRole("link", { name: "Settings" }).click();
  const config = page.getByTestId("config");
  await config.waitFor();
  const text = await config.textContent();
  assert(text.includes("key_pools") && text.includes(upstreamUrl), "the effective config is shown");
  assert(!text.includes(LIMITED) && !text.includes(GOOD), "a pool key in the config view");
  const prices = page.getByTestId("prices");
  await prices.waitFor();
  assert((await page.getByTestId("currency").textContent()).includes("USD"), "the price table's currency");
  await prices.locator("tr", { hasText: "gpt-4o" }).first().waitFor();
  assert((await prices.getByText(/^builtin\//).count()) > 0, "the shipped rules with their version");
  await page.getByRole("button", { name: "Reload fastgate.yaml and routes.d" }).click();
  await page.getByText(/Reloaded: 2 routes, 1 upstreams, 1 key pools/).waitFor();
  await shoot("settings");
});

await step("no secret is rendered", async () => {
  const html = await page.content();
  assert(![LIMITED, GOOD, EXTRA].some((k) => html.includes(k)), "a pool key is on the page");
});

await step("log out", async () => {
  await page.getByRole("button", { name: "Log out" }).click();
  await page.getByText("You logged out.").waitFor();
});

await step("no errors in the browser console", async () => {
  assert(consoleErrors.length === 0, consoleErrors.join("\n"));
});

await browser.close();
gateway.kill("SIGTERM");
upstream.close();
console.log(`${passed} passed, ${failures} failed`);
if (failures) {
  console.log(gatewayLog.split("\n").slice(-40).join("\n"));
  process.exit(1);
}
