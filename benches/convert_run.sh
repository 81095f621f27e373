#!/usr/bin/env bash
# Conversion load run, alternated in one session, one SSE upstream (11
# content events + framing per stream, no delay), every route on FastGate's
# own forwarding path (retries: 1):
#   native-openai     OpenAI client <- OpenAI-speaking upstream (same client bytes)
#   native-anthropic  Anthropic client <- Anthropic-speaking upstream (same upstream bytes)
#   converted         OpenAI client <- Anthropic-speaking upstream, event by event
# Reports RPS and the proxy's CPU per request.
#   bash benches/convert_run.sh            # 8 s per run, 2 rounds, c32, events back to back
#   EVENT_DELAY_MS=1 CONNS=256 bash benches/convert_run.sh   # events 1 ms apart (each its own read), 256 streams
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh
DURATION=${DURATION:-8}; ROUNDS=${ROUNDS:-2}; CONNS=${CONNS:-32}
BASE=${BASE_PORT:-18300}; UP=$BASE; FG=$((BASE+1)); ADMIN=$((BASE+2))
for tool in wrk python3; do command -v $tool >/dev/null || { echo "missing $tool"; exit 1; }; done
cargo build --release --locked --bin fastgate >&2
bench_workdir
python3 benches/sse_upstream.py $UP "${EVENT_DELAY_MS:-0}" & PIDS+=($!)
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
  - { name: native-openai, match: { path: /native-openai/v1/chat/completions }, format: openai, auth: none, upstream: oa, retries: 1, transform: { strip_prefix: /native-openai } }
  - { name: native-anthropic, match: { path: /native-anthropic/v1/messages }, format: anthropic, auth: none, upstream: an, retries: 1, transform: { strip_prefix: /native-anthropic } }
  - { name: converted, match: { path: /converted/v1/chat/completions }, format: openai, auth: none, upstream: an, retries: 1, transform: { strip_prefix: /converted } }
YML
FASTGATE_ADMIN_PASSWORD=bench-admin-password target/release/fastgate serve -c "$WORK/fastgate.yaml" >/dev/null 2>"$WORK/log" & PIDS+=($!)
FG_PID=$!
for p in $UP $FG; do for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/$p) 2>/dev/null && break; sleep 0.1; done; done
sleep 0.5
declare -A URL
URL[native-openai]="http://127.0.0.1:$FG/native-openai/v1/chat/completions"
URL[native-anthropic]="http://127.0.0.1:$FG/native-anthropic/v1/messages"
URL[converted]="http://127.0.0.1:$FG/converted/v1/chat/completions"
CONFIGS=(native-openai native-anthropic converted)
for c in "${CONFIGS[@]}"; do
  out=$(curl -sN -X POST -H 'content-type: application/json' -d '{"model":"m","stream":true,"max_tokens":16,"messages":[{"role":"user","content":"hi"}]}' "${URL[$c]}")
  echo "$out" | grep -qE '\[DONE\]|message_stop' || { echo "$c: no end: $out" >&2; cat "$WORK/log" >&2; exit 1; }
done
HZ=$(getconf CLK_TCK)
ticks() { awk '{print $14+$15}' /proc/$FG_PID/stat; }
declare -A RPS CPU
for r in $(seq "$ROUNDS"); do
  for c in "${CONFIGS[@]}"; do
    b=$(ticks)
    out=$(wrk -t1 -c"$CONNS" -d"${DURATION}s" -s benches/stream.lua "${URL[$c]}")
    a=$(ticks)
    n=$(echo "$out" | awk '/requests in/ {print $1}')
    rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
    cpu=$(awk -v d=$((a-b)) -v hz=$HZ -v n=$n 'BEGIN {printf "%.1f", d*1e6/hz/n}')
    echo "round $r $c: rps=$rps cpu=${cpu}us/req" >&2
    RPS[$c]="${RPS[$c]:-} $rps"; CPU[$c]="${CPU[$c]:-} $cpu"
  done
done
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END { if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2 }'; }
echo "| stream | RPS (median) | FastGate CPU µs/req |"
echo "|---|---:|---:|"
for c in "${CONFIGS[@]}"; do echo "| $c | $(echo ${RPS[$c]} | median) | $(echo ${CPU[$c]} | median) |"; done
echo
CR=$(echo ${RPS[converted]} | median); CC=$(echo ${CPU[converted]} | median)
for n in native-openai native-anthropic; do
  NR_=$(echo ${RPS[$n]} | median); NC=$(echo ${CPU[$n]} | median)
  echo "- converted vs $n: $(awk -v a=$CR -v b=$NR_ 'BEGIN{printf "%.2f", a/b}') × RPS, +$(awk -v a=$CC -v b=$NC 'BEGIN{printf "%.1f", a-b}') µs CPU per stream"
done
