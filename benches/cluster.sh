#!/usr/bin/env bash
# Cost of cluster mode's shared limiter on one node: the same FastGate route
# and gateway keys with limits counted locally (cluster off) and in Redis
# (cluster on), alternated in one session, against the upstream directly.
# Needs: wrk, nginx, redis-server, curl, python3.
#
#   bash benches/cluster.sh              # 8 s per run, 3 rounds, c32
#   DURATION=15 ROUNDS=3 bash benches/cluster.sh
#
# Keys: `rpm` has a requests-per-minute limit (one Redis call per request:
# admit); `rpm+tpm` adds tokens per minute (two: admit with a reservation,
# then settle). The limits are far above the load: every request is
# counted, none refused.
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh

DURATION=${DURATION:-8}
ROUNDS=${ROUNDS:-3}
CONNS=${CONNS:-32}
OUT=${OUT:-benches/results/cluster-latest.md}
BASE=${BASE_PORT:-18300}
UP=$BASE; OFF=$((BASE+1)); ON=$((BASE+2)); REDIS=$((BASE+3))

for tool in wrk nginx redis-server curl python3; do
  command -v $tool >/dev/null || { echo "missing $tool (apt-get install wrk nginx-light redis-server curl)"; exit 1; }
done
cargo build --release --locked --bin fastgate >&2
FASTGATE=target/release/fastgate

bench_workdir
start_json_upstream $UP
mkdir -p "$WORK/redis"
redis-server --bind 127.0.0.1 --port $REDIS --save '' --appendonly no --dir "$WORK/redis" >/dev/null & PIDS+=($!)

fastgate_bench_config "$WORK/off" $OFF $((BASE+10)) openai $UP
fastgate_bench_config "$WORK/on" $ON $((BASE+11)) openai $UP "cluster: { redis: 'redis://127.0.0.1:$REDIS', node_id: bench }"
key() { # config -> secret of a new key with the given limits
  local cfg=$1; shift
  $FASTGATE keys -c "$cfg" create --name bench --json "$@" | python3 -c 'import json,sys; print(json.load(sys.stdin)["secret"])'
}
KEY_RPM=$(key "$WORK/off/fastgate.yaml" --rpm 100000000)
KEY_TPM=$(key "$WORK/off/fastgate.yaml" --rpm 100000000 --tpm 100000000000)
cp "$WORK/off/fg.db" "$WORK/on/fg.db"
$FASTGATE serve -c "$WORK/off/fastgate.yaml" >/dev/null 2>"$WORK/off/log" & PIDS+=($!)
OFF_PID=$!
$FASTGATE serve -c "$WORK/on/fastgate.yaml" >/dev/null 2>"$WORK/on/log" & PIDS+=($!)
ON_PID=$!
for p in $UP $OFF $ON $REDIS; do wait_port $p; done
for _ in $(seq 50); do curl -s "http://127.0.0.1:$((BASE+11))/metrics" | grep -q '^fastgate_cluster_redis_up 1' && break; sleep 0.1; done
curl -s "http://127.0.0.1:$((BASE+11))/metrics" | grep -q '^fastgate_cluster_redis_up 1' || { echo "cluster node never reached Redis" >&2; cat "$WORK/on/log" >&2; exit 1; }

declare -A URL
URL[direct]="http://127.0.0.1:$UP/v1/chat/completions"
URL[off]="http://127.0.0.1:$OFF/v1/chat/completions"
URL[on]="http://127.0.0.1:$ON/v1/chat/completions"
to_ms() { awk -v v="$1" 'BEGIN { if (v ~ /us$/) {sub(/us/,"",v); print v/1000} else if (v ~ /ms$/) {sub(/ms/,"",v); print v+0} else if (v ~ /s$/) {sub(/s/,"",v); print v*1000} else print v }'; }
run_wrk() { # target key conns duration -> R_RPS R_P50 R_P99
  local out
  out=$(FG_KEY=$2 wrk -t1 -c"$3" -d"${4}s" --latency -s benches/post.lua "${URL[$1]}")
  local non2xx; non2xx=$(echo "$out" | awk '/Non-2xx/ {print $4}')
  [ -z "$non2xx" ] || { echo "$1: $non2xx non-2xx responses" >&2; exit 1; }
  R_RPS=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  R_P50=$(to_ms "$(echo "$out" | awk '$1=="50%" {print $2}')")
  R_P99=$(to_ms "$(echo "$out" | awk '$1=="99%" {print $2}')")
}
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END { if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2 }'; }

# name target key
CASES=("direct direct none" "off-rpm off $KEY_RPM" "on-rpm on $KEY_RPM" "off-rpm+tpm off $KEY_TPM" "on-rpm+tpm on $KEY_TPM")
declare -A RPS P50 P99 L50 L99
echo "warming up" >&2
for c in "${CASES[@]}"; do set -- $c; run_wrk $2 $3 8 2; done
for r in $(seq "$ROUNDS"); do
  for c in "${CASES[@]}"; do
    set -- $c
    run_wrk $2 $3 "$CONNS" "$DURATION"
    RPS[$1]="${RPS[$1]:-} $R_RPS"; P50[$1]="${P50[$1]:-} $R_P50"; P99[$1]="${P99[$1]:-} $R_P99"
    run_wrk $2 $3 1 3
    L50[$1]="${L50[$1]:-} $R_P50"; L99[$1]="${L99[$1]:-} $R_P99"
    echo "round $r $1: rps=${RPS[$1]##* } c1 p50=${R_P50}ms p99=${R_P99}ms" >&2
  done
done
# Every request was counted in Redis.
CALLS=$(redis-cli -p $REDIS info commandstats | awk -F'[=,:]' '/cmdstat_fcall:/ {print $3}')

m() { echo $1 | median; }
{
  echo "### Cluster limiter run $(date -u +%Y-%m-%dT%H:%MZ) — $(nproc) cores, ${DURATION}s x ${ROUNDS} rounds, c$CONNS and c1, one worker thread, Redis on loopback"
  echo
  echo "| configuration | RPS c$CONNS | p50 ms | p99 ms | c1 p50 ms | c1 p99 ms |"
  echo "|---|---:|---:|---:|---:|---:|"
  for c in "${CASES[@]}"; do
    set -- $c
    echo "| $1 | $(m "${RPS[$1]}") | $(m "${P50[$1]}") | $(m "${P99[$1]}") | $(m "${L50[$1]}") | $(m "${L99[$1]}") |"
  done
  echo
  for k in rpm rpm+tpm; do
    echo "- $k: cluster on vs off $(awk -v a=$(m "${RPS[on-$k]}") -v b=$(m "${RPS[off-$k]}") 'BEGIN{printf "%.2f", a/b}') × RPS; added at c1: p50 $(awk -v a=$(m "${L50[on-$k]}") -v b=$(m "${L50[off-$k]}") 'BEGIN{printf "%.3f", a-b}') ms, p99 $(awk -v a=$(m "${L99[on-$k]}") -v b=$(m "${L99[off-$k]}") 'BEGIN{printf "%.3f", a-b}') ms"
  done
  echo "- Redis function calls during the run: $CALLS"
} | tee "$OUT"
