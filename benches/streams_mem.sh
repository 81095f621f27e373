#!/usr/bin/env bash
# Memory per open SSE stream: bare Pingora vs FastGate, side by side, on
# 127.0.0.1. A slow upstream (one event per second) keeps N streams open
# while benches/stream_clients.py holds them and samples the proxy's RSS.
# Each proxy starts fresh for each N, so every row starts from its idle RSS.
#
#   bash benches/streams_mem.sh                  # N = 1000 and 10000
#   COUNTS="1000 5000" HOLD=10 bash benches/streams_mem.sh
#
# A proxy holds two sockets per stream (client and upstream): N is capped at
# (open-file limit - 200) / 2 per process, with a warning, when `ulimit -n`
# is lower than that needs. FastGate runs with everything on (auth, routing,
# key injection, usage metering, metrics, audit with header capture).
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh

COUNTS=${COUNTS:-"1000 10000"}
HOLD=${HOLD:-5}
BASE=${BASE_PORT:-18300}
UP=$BASE; PINGORA=$((BASE+1)); FG=$((BASE+2))
OUT=${OUT:-benches/results/streams-latest.md}

cargo build --release --locked --bin fastgate --example bare_pingora >&2
FASTGATE=target/release/fastgate
BARE=target/release/examples/bare_pingora
bench_workdir

LIMIT=$(ulimit -n)
MAX=$(( (LIMIT - 200) / 2 ))

# One event per second for up to 10 minutes: streams outlive every hold.
python3 benches/sse_upstream.py $UP 1000 600 2>/dev/null & PIDS+=($!)
wait_port $UP

fastgate_bench_config "$WORK/fg" $FG $((BASE+10)) openai_compatible $UP
create_bench_key "$WORK/fg/fastgate.yaml"

start_proxy() { # name -> PROXY_PID, PROXY_PORT
  case $1 in
    pingora) $BARE 127.0.0.1:$PINGORA 127.0.0.1:$UP 1 2>/dev/null & PROXY_PID=$!; PROXY_PORT=$PINGORA;;
    fastgate) FASTGATE_ADMIN_PASSWORD=bench-admin-password $FASTGATE serve -c "$WORK/fg/fastgate.yaml" >/dev/null 2>"$WORK/fg/log" &
              PROXY_PID=$!; PROXY_PORT=$FG;;
  esac
  PIDS+=($PROXY_PID)
  wait_port $PROXY_PORT
  sleep 1
}

declare -A IDLE PEAK PER
ROWS=()
for n in $COUNTS; do
  if [ "$n" -gt "$MAX" ]; then
    echo "N=$n needs $((2 * n + 200)) open files per proxy; ulimit -n is $LIMIT: measuring N=$MAX instead" >&2
    n=$MAX
  fi
  for proxy in pingora fastgate; do
    start_proxy $proxy
    json=$(python3 benches/stream_clients.py $PROXY_PORT $PROXY_PID $n $HOLD)
    echo "$proxy N=$n $json" >&2
    kill $PROXY_PID; wait $PROXY_PID 2>/dev/null || true
    read -r idle peak open failed <<<"$(echo "$json" | python3 -c 'import json,sys; j=json.load(sys.stdin); print(j["rss_kb_before"], j["rss_kb_max"], j["least_open_during_hold"], j["failed"])')"
    if [ "$open" -lt "$n" ] || [ "$failed" -gt 0 ]; then
      echo "$proxy: only $open of $n streams stayed open ($failed failed)" >&2; exit 1
    fi
    IDLE[$proxy]=$idle; PEAK[$proxy]=$peak
    PER[$proxy]=$(awk -v a=$idle -v b=$peak -v n=$n 'BEGIN {printf "%.1f", (b-a)/n}')
  done
  ratio=$(awk -v f=${PER[fastgate]} -v p=${PER[pingora]} 'BEGIN {printf "%.2f", f/p}')
  ROWS+=("| $n | $((IDLE[pingora]/1024)) → $((PEAK[pingora]/1024)) | ${PER[pingora]} | $((IDLE[fastgate]/1024)) → $((PEAK[fastgate]/1024)) | ${PER[fastgate]} | **${ratio}×** |")
done

{
  echo "### Memory per open SSE stream — $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "One worker thread per proxy, upstream event every 1 s, RSS sampled every 0.5 s for ${HOLD} s with all streams open."
  echo
  echo "| streams | Pingora RSS MiB (idle → peak) | Pingora KiB/stream | FastGate RSS MiB (idle → peak) | FastGate KiB/stream | FastGate / Pingora per stream |"
  echo "|---|---|---|---|---|---|"
  printf '%s\n' "${ROWS[@]}"
} | tee "$OUT"
