# Used by benches/audit_queries.sh. Fill an initialised FastGate database with N audit rows over the last 24 h.
import sqlite3, sys, random, time, uuid, math, struct
db, n = sys.argv[1], int(sys.argv[2])
c = sqlite3.connect(db)
c.execute("PRAGMA journal_mode=WAL"); c.execute("PRAGMA synchronous=OFF")
now = int(time.time() * 1000); span = 86_400_000
keys = [f"key_{i:04d}" for i in range(200)]
routes = ["chat", "messages", "gemini", "responses", "embed"]
models = ["gpt-4o-mini", "gpt-4o", "claude-sonnet-4", "gemini-2.5-flash", "o3"]
statuses = [200] * 95 + [429, 429, 500, 502, 400]
random.seed(7)
cols = "request_id, ts_ms, key_id, owner, route, upstream, endpoint, upstream_key_id, method, path, status, model, stream, ttfb_ms, duration_ms, request_bytes, response_bytes, chunks, prompt_tokens, completion_tokens, retries, error, client_ip, user_agent, user_id, usage_estimated"
q = f"INSERT INTO audit_log ({cols}) VALUES ({','.join('?' * 26)})"
chunk = 100_000
t0 = time.time()
roll = {}
for start in range(0, n, chunk):
    rows = []
    for i in range(start, min(n, start + chunk)):
        ts = now - span + (i * span) // n  # in time order, like a live log
        k = random.randrange(200); st = random.choice(statuses)
        rows.append((uuid.uuid4().hex, ts, keys[k], f"owner{k % 20}", random.choice(routes), "oai",
                     "https://api.openai.com", "pk_1", "POST", "/v1/chat/completions", st, random.choice(models),
                     i % 2, 120.0 + i % 300, 400.0 + i % 900, 600, 900, i % 50, 100 + i % 500, 20 + i % 200, 0,
                     None if st == 200 else "upstream error", "10.0.0.%d" % (k % 250), "openai-python/1.0",
                     f"usr_{k % 20}", 0))
    c.executemany(q, rows); c.commit()
    for r in rows:  # the per-minute rollup FastGate's indexer keeps beside the rows
        g = roll.setdefault((r[1] // 60000, r[4], r[5], r[11]), [0, 0, 0.0, 0, 0.0, 0, 0, {}, {}])
        g[0] += 1; g[1] += r[10] >= 400; g[2] += r[14]; g[3] += 1; g[4] += r[13]; g[5] += r[18]; g[6] += r[19]
        for h, ms in ((g[7], r[14]), (g[8], r[13])):
            b = 0 if ms <= 0.01 else min(1199, math.ceil(math.log(ms / 0.01) / math.log(1.02)))
            h[b] = h.get(b, 0) + 1
    print(f"{start + len(rows)} rows, {time.time() - t0:.0f} s", flush=True)
blob = lambda h: b"".join(struct.pack("<HI", b, n) for b, n in sorted(h.items()))
c.executemany("INSERT OR REPLACE INTO audit_rollup VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
              [(*k, *v[:7], blob(v[7]), blob(v[8])) for k, v in roll.items()])
c.commit()
print(f"{len(roll)} rollup rows", flush=True)
