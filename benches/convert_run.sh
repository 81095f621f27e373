#!/usr/bin/env bash
# Conversion load run: an OpenAI client streaming through FastGate from an
# OpenAI-speaking upstream (native) and from an Anthropic-speaking one
# (converted event by event), alternated in one session, same SSE upstream
# (11 content events + framing per stream, no delay). Reports RPS and the
# proxy's CPU per request; the difference per event is the conversion cost.
#   bash benches/convert_run.sh            # 8 s per run, 2 rounds, c32
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-8}; ROUNDS=${ROUNDS:-2}; CONNS=${CONNS:-32}
BASE=${BASE_PORT:-18300}; UP=$BASE; FG=$((BASE+1)); ADMIN=$((BASE+2))
for tool in wrk python3; do command -v $tool >/dev/null || { echo "missing $tool"; exit 1; }; done
cargo build --release --locked --bin fastgate >&2
WORK=$(mktemp -d); PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; sleep 0.3; rm -rf "$WORK"; }
trap cleanup EXIT
python3 benches/sse_upstream.py $UP 0 & PIDS+=($!)
mkdir -p "$WORK/routes.d"
cat > "$WORK/fastgate.yaml" <<YML
server: { listen: 127.0.0.1:$FG, threads: 1 }
admin: { listen: 127.0.0.1:$ADMIN }
database: { path: $WORK/fg.db }
logging: { level: warn }
routes_dir: $WORK/routes.d
upstreams:
  oa: { provider: openai_compatible, endpoints: ['http://127.0.0.1:$UP'], key_pool: p }
  an: { provider: anthropic, endpoints: ['http://127.0.0.1:$UP'], key_pool: p }
key_pools:
  p: { keys: [sk-bench] }
YML
cat > "$WORK/routes.d/r.yaml" <<YML
routes:
  - { name: native, match: { path: /native/v1/chat/completions }, format: openai, auth: none, upstream: oa, transform: { strip_prefix: /native } }
  - { name: convert, match: { path: /convert/v1/chat/completions }, format: openai, auth: none, upstream: an, transform: { strip_prefix: /convert } }
YML
FASTGATE_ADMIN_PASSWORD=bench-admin-password target/release/fastgate serve -c "$WORK/fastgate.yaml" >/dev/null 2>"$WORK/log" & PIDS+=($!)
FG_PID=$!
for p in $UP $FG; do for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/$p) 2>/dev/null && break; sleep 0.1; done; done
sleep 0.5
for c in native convert; do
  out=$(curl -sN -X POST -H 'content-type: application/json' -d '{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}' "http://127.0.0.1:$FG/$c/v1/chat/completions")
  echo "$out" | grep -q '\[DONE\]' || { echo "$c: no [DONE]: $out" >&2; cat "$WORK/log" >&2; exit 1; }
done
HZ=$(getconf CLK_TCK)
ticks() { awk '{print $14+$15}' /proc/$FG_PID/stat; }
declare -A RPS CPU
for r in $(seq "$ROUNDS"); do
  for c in native convert; do
    b=$(ticks)
    out=$(wrk -t1 -c"$CONNS" -d"${DURATION}s" -s benches/stream.lua "http://127.0.0.1:$FG/$c/v1/chat/completions")
    a=$(ticks)
    n=$(echo "$out" | awk '/requests in/ {print $1}')
    rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
    cpu=$(awk -v d=$((a-b)) -v hz=$HZ -v n=$n 'BEGIN {printf "%.1f", d*1e6/hz/n}')
    echo "round $r $c: rps=$rps cpu=${cpu}us/req" >&2
    RPS[$c]="${RPS[$c]:-} $rps"; CPU[$c]="${CPU[$c]:-} $cpu"
  done
done
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END { if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2 }'; }
NR_=$(echo ${RPS[native]} | median); CR=$(echo ${RPS[convert]} | median)
NC=$(echo ${CPU[native]} | median); CC=$(echo ${CPU[convert]} | median)
echo "| stream | RPS (median) | FastGate CPU µs/req |"
echo "|---|---:|---:|"
echo "| native (OpenAI upstream) | $NR_ | $NC |"
echo "| converted (Anthropic upstream) | $CR | $CC |"
echo
echo "- converted vs native: $(awk -v a=$CR -v b=$NR_ 'BEGIN{printf "%.2f", a/b}') × RPS; conversion CPU per stream event: $(awk -v a=$CC -v b=$NC 'BEGIN{printf "%.2f", (a-b)/14}') µs (14 upstream events per stream)"
