#!/usr/bin/env bash
# Soak: FastGate (everything on, audit with header capture) at about half of
# its maximum RPS for SOAK_S seconds (default 600). Once a second it samples
# the proxy's RSS (/proc) and its request counter (/metrics), then writes a
# CSV, a PNG plot (RSS and RPS over time) and a verdict: RSS after warm-up
# (the first WARMUP_S seconds, default 60) within ±5 % of its mean, no
# non-2xx answers and no dropped audit rows.
#
#   bash benches/soak.sh                       # 10 minutes
#   SOAK_S=120 bash benches/soak.sh            # a quick look
#
# The audit log grows by roughly 1 KB per request (about 6 GB in 10 minutes
# at 10k RPS): check free disk space first.
# Needs wrk, nginx, curl, python3; the plot needs matplotlib (installed into
# target/bench-venv on first use). Output: benches/results/soak-latest.{csv,md}
# and docs/soak.png (PLOT=... to write it elsewhere).
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh

SOAK_S=${SOAK_S:-600}
WARMUP_S=${WARMUP_S:-60}
LOAD=${LOAD:-0.5}
DELAY_MS=${DELAY_MS:-5}
BASE=${BASE_PORT:-18400}
UP=$BASE; FG=$((BASE+1)); ADMIN=$((BASE+2))
CSV=benches/results/soak-latest.csv
MD=benches/results/soak-latest.md
PLOT=${PLOT:-docs/soak.png}

for tool in wrk nginx curl python3; do
  command -v $tool >/dev/null || { echo "missing $tool (apt-get install wrk nginx-light curl)"; exit 1; }
done
VENV=target/bench-venv
if ! "$VENV/bin/python" -c 'import matplotlib' 2>/dev/null; then
  python3 -m venv "$VENV" && "$VENV/bin/pip" install -q matplotlib
fi
cargo build --release --locked --bin fastgate >&2
FASTGATE=target/release/fastgate

bench_workdir
start_json_upstream $UP
fastgate_bench_config "$WORK/fg" $FG $ADMIN openai $UP
create_bench_key "$WORK/fg/fastgate.yaml"
FASTGATE_ADMIN_PASSWORD=bench-admin-password $FASTGATE serve -c "$WORK/fg/fastgate.yaml" >/dev/null 2>"$WORK/fg/log" & PIDS+=($!)
FG_PID=$!
wait_port $UP; wait_port $FG; wait_port $ADMIN
URL=http://127.0.0.1:$FG/v1/chat/completions

rps_of() { awk '/Requests\/sec/ {printf "%d", $2}'; }
MAX=$(wrk -t1 -c32 -d5s -s benches/post.lua $URL | rps_of)
TARGET=$(awk -v m=$MAX -v l=$LOAD 'BEGIN {printf "%d", m*l}')
# Paced connections: each waits DELAY_MS between requests. One calibration run.
CONNS=$(awk -v t=$TARGET -v d=$DELAY_MS 'BEGIN {c=int(t*(d+0.3)/1000+0.5); print (c<1?1:c)}')
GOT=$(DELAY_MS=$DELAY_MS wrk -t1 -c$CONNS -d5s -s benches/delay.lua $URL | rps_of)
CONNS=$(awk -v c=$CONNS -v t=$TARGET -v g=$GOT 'BEGIN {c=int(c*t/g+0.5); print (c<1?1:c)}')
echo "max $MAX RPS; target $TARGET RPS with $CONNS paced connections (calibration gave $GOT)" >&2

requests_total() { curl -s http://127.0.0.1:$ADMIN/metrics | awk '/^fastgate_requests_total/ {s+=$NF} END {printf "%d", s}'; }
DELAY_MS=$DELAY_MS wrk -t1 -c$CONNS -d${SOAK_S}s -s benches/delay.lua $URL > "$WORK/wrk.out" & WRK=$!
PIDS+=($WRK)
echo "t_s,rss_kb,requests_total" > $CSV
start=$(date +%s.%N)
echo "0,$(awk '/VmRSS/ {print $2}' /proc/$FG_PID/status),$(requests_total)" >> $CSV
for t in $(seq 1 "$SOAK_S"); do
  sleep $(awk -v s=$start -v t=$t -v now=$(date +%s.%N) 'BEGIN {d=s+t-now; print (d>0?d:0)}')
  echo "$t,$(awk '/VmRSS/ {print $2}' /proc/$FG_PID/status),$(requests_total)" >> $CSV
done
wait $WRK || true
NON2XX=$(awk '/Non-2xx/ {print $4}' "$WORK/wrk.out")
HEALTH=$(curl -s http://127.0.0.1:$ADMIN/health/ready)
DB_MB=$(du -sm "$WORK/fg" | awk '{print $1}')

"$VENV/bin/python" - "$CSV" "$PLOT" "$WARMUP_S" "$MAX" "$TARGET" "${NON2XX:-0}" "$HEALTH" "$DB_MB" <<'PY' | tee "$MD"
import csv, json, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
path, plot, warm, mx, target, non2xx, health, db_mb = sys.argv[1:9]
rows = list(csv.DictReader(open(path)))
t = [int(r["t_s"]) for r in rows]
rss = [int(r["rss_kb"]) / 1024 for r in rows]
total = [int(r["requests_total"]) for r in rows]
rps = [b - a for a, b in zip(total, total[1:])]
t, rss, total = t[1:], rss[1:], total[1:]
after = [r for x, r in zip(t, rss) if x > int(warm)]
mean = sum(after) / len(after)
spread = max(abs(max(after) - mean), abs(mean - min(after))) / mean * 100
steady = rps
audit = json.loads(health).get("audit", {})
flat = spread <= 5
fig, ax = plt.subplots(figsize=(9, 4.5))
ax.plot(t, rss, color="tab:blue", label="RSS (MiB)")
ax.set_xlabel("seconds")
ax.set_ylabel("RSS (MiB)", color="tab:blue")
ax.set_ylim(0, max(rss) * 1.3)
ax.axvline(int(warm), color="grey", linestyle=":", linewidth=1)
ax2 = ax.twinx()
ax2.plot(t, rps, color="tab:orange", linewidth=0.6, label="requests/s")
ax2.set_ylabel("requests/s", color="tab:orange")
ax2.set_ylim(0, max(rps) * 1.3)
ax.set_title(f"FastGate soak: {len(t)} s at {target} RPS target (max {mx}); RSS after warm-up {mean:.1f} MiB ±{spread:.1f} %")
fig.tight_layout()
fig.savefig(plot, dpi=100)
print(f"### Soak — {len(t)} s, target {target} RPS (50 % of the {mx} RPS maximum)\n")
print(f"- RPS over the run: mean {sum(steady)/len(steady):.0f}, min {min(steady)}, max {max(steady)} (per second, from /metrics)")
print(f"- RSS: start {rss[0]:.1f} MiB; after the {warm} s warm-up mean {mean:.1f} MiB, min {min(after):.1f}, max {max(after):.1f}: ±{spread:.1f} % ({'flat' if flat else 'NOT flat'})")
print(f"- non-2xx answers: {non2xx}; audit rows written {audit.get('written_total')}, dropped {audit.get('dropped_total')}, write errors {audit.get('write_errors_total')}")
print(f"- database with the audit log at the end: {db_mb} MB")
print(f"- plot: {plot}")
ok = flat and non2xx == "0" and audit.get("dropped_total") == 0
sys.exit(0 if ok else 1)
PY
