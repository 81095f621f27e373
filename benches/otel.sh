#!/usr/bin/env bash
# The cost of OpenTelemetry tracing: one FastGate binary, two instances
# (tracing off / `otel: {sample_ratio: 0.1}` exporting over OTLP/HTTP to a
# local sink that answers 200), alternated off on off on ... against the
# nginx JSON upstream, everything on 127.0.0.1. Needs wrk, nginx, python3.
#
#   FASTGATE=/path/to/release/fastgate bash benches/otel.sh
#   DURATION=8 ROUNDS=3 CONNS=32 RATIO=0.1 bash benches/otel.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh

DURATION=${DURATION:-8}
ROUNDS=${ROUNDS:-3}
CONNS=${CONNS:-32}
RATIO=${RATIO:-0.1}
BASE=${BASE_PORT:-18300}
UP=$BASE; OFF=$((BASE+1)); ON=$((BASE+2)); SINK=$((BASE+3))
if [ -z "${FASTGATE:-}" ]; then
  cargo build --release --locked --bin fastgate >&2
  FASTGATE=${CARGO_TARGET_DIR:-target}/release/fastgate
fi
export FASTGATE

bench_workdir
start_json_upstream $UP
# The OTLP/HTTP sink: counts the export calls, answers an empty 200.
cat > "$WORK/sink.py" <<'PY'
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    calls = 0
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        H.calls += 1
        self.send_response(200); self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0"); self.end_headers()
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
PY
python3 "$WORK/sink.py" $SINK & PIDS+=($!)

fastgate_bench_config "$WORK/off" $OFF $((BASE+10)) openai $UP
fastgate_bench_config "$WORK/on" $ON $((BASE+11)) openai $UP "otel: { endpoint: 'http://127.0.0.1:$SINK', sample_ratio: $RATIO }"
for c in off on; do
  create_bench_key "$WORK/$c/fastgate.yaml"; eval "KEY_$c=\$FG_KEY"
  "$FASTGATE" serve -c "$WORK/$c/fastgate.yaml" 2>"$WORK/$c/log" & PIDS+=($!); eval "PID_$c=$!"
done
HZ=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' /proc/$1/stat; }  # utime + stime, all threads
wait_port $OFF; wait_port $ON; wait_port $SINK

to_ms() { awk -v v="$1" 'BEGIN { if (v ~ /us$/) {sub(/us/,"",v); print v/1000} else if (v ~ /ms$/) {sub(/ms/,"",v); print v+0} else if (v ~ /s$/) {sub(/s/,"",v); print v*1000} else print v }'; }
run() { # config conns duration -> R_RPS R_P99 R_CPU (FastGate's CPU µs per request, exporter thread included)
  local port key out pid before after
  if [ "$1" = off ]; then port=$OFF key=$KEY_off pid=$PID_off; else port=$ON key=$KEY_on pid=$PID_on; fi
  before=$(cpu_ticks $pid)
  out=$(FG_KEY=$key wrk -t1 -c"$2" -d"${3}s" --latency -s benches/post.lua "http://127.0.0.1:$port/v1/chat/completions")
  sleep 1.2  # the last batch of spans leaves within flush_interval (1 s)
  after=$(cpu_ticks $pid)
  local non2xx; non2xx=$(echo "$out" | awk '/Non-2xx/ {print $4}')
  [ -z "$non2xx" ] || { echo "$1: $non2xx non-2xx responses" >&2; exit 1; }
  R_RPS=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  R_P99=$(to_ms "$(echo "$out" | awk '$1=="99%" {print $2}')")
  local n; n=$(echo "$out" | awk '/requests in/ {print $1}')
  R_CPU=$(awk -v d=$((after-before)) -v hz=$HZ -v n=$n 'BEGIN {printf "%.1f", d*1e6/hz/n}')
}
run off 8 2; run on 8 2
declare -A RPS P99 CPU
for r in $(seq "$ROUNDS"); do
  for c in off on; do
    run $c "$CONNS" "$DURATION"
    echo "round $r $c: rps=$R_RPS p99=${R_P99}ms cpu=${R_CPU}us/req" >&2
    RPS[$c]="${RPS[$c]:-} $R_RPS"; P99[$c]="${P99[$c]:-} $R_P99"; CPU[$c]="${CPU[$c]:-} $R_CPU"
  done
done
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
exported=$(curl -s "http://127.0.0.1:$((BASE+11))/metrics" | awk '/^fastgate_otel_spans_exported_total/ {print $2}')
dropped=$(curl -s "http://127.0.0.1:$((BASE+11))/metrics" | awk '/^fastgate_otel_spans_dropped_total/ {s+=$2} END {print s+0}')
ro=$(echo "${RPS[off]}" | median); rn=$(echo "${RPS[on]}" | median)
po=$(echo "${P99[off]}" | median); pn=$(echo "${P99[on]}" | median)
co=$(echo "${CPU[off]}" | median); cn=$(echo "${CPU[on]}" | median)
echo "| tracing | RPS (median of $ROUNDS) | p99 ms (median) | FastGate CPU µs/req (median) |"
echo "|---|---|---|---|"
echo "| off | $ro | $po | $co |"
echo "| on, sample_ratio $RATIO | $rn | $pn | $cn |"
awk -v a="$rn" -v b="$ro" -v c="$pn" -v d="$po" -v e="$cn" -v f="$co" 'BEGIN {printf "on/off: RPS %.3f, p99 %.3f, CPU/req %.3f\n", a/b, c/d, e/f}'
echo "spans exported: $exported, dropped: $dropped"
