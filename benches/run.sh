#!/usr/bin/env bash
# FastGate load benchmark: one session, configurations alternated A B C D A B C D,
# everything on 127.0.0.1. Needs: wrk, nginx, curl, python3 (apt: wrk nginx-light curl).
#
#   bash benches/run.sh                 # defaults: 8 s per run, 2 rounds, c32
#   DURATION=15 ROUNDS=3 bash benches/run.sh
#
# Configurations (all answer the same small JSON POST):
#   direct   wrk -> nginx `return 200` (the upstream itself)
#   nginx    wrk -> nginx proxy_pass (keepalive 64) -> upstream
#   pingora  wrk -> bare Pingora ProxyHttp (benches/bare_pingora.rs) -> upstream
#   fastgate wrk -> FastGate: gateway-key auth, model-glob routing (body read),
#                   pool key injection -> upstream
#   fg-plain wrk -> FastGate route with auth + key injection, body streamed by Pingora
#   fg-noaudit  the `fastgate` configuration on a second instance with `audit.enabled: false`
#   fg-1key / fg-100keys  the `fastgate` route through a pool of 1 key / of 100 keys
#                   (key selection must cost nothing measurable)
# Each proxy gets PROXY_THREADS worker threads (default 1: a 2-core machine also
# runs wrk and the upstream). CPU per request is read from /proc for the proxy
# (all its threads), until its audit rows are all written after the run.
#
# A/B of two builds in one run: FASTGATE_B=path/to/other/fastgate adds
# `b-fastgate` and `b-fg-noaudit` (the same two configurations on that binary)
# to the alternation, and the summary gives B against A. FASTGATE=path uses a
# given binary as A instead of building one (and BARE=path a given bare
# Pingora), e.g.
#   git worktree add /tmp/old <commit> && (cd /tmp/old && cargo build --release --bin fastgate)
#   FASTGATE_B=/tmp/old/target/release/fastgate bash benches/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh

DURATION=${DURATION:-8}
ROUNDS=${ROUNDS:-2}
CONNS=${CONNS:-32}
PROXY_THREADS=${PROXY_THREADS:-1}
OUT=${OUT:-benches/results/latest.md}
BASE=${BASE_PORT:-18100}
UP=$BASE; PINGORA=$((BASE+1)); NGINX=$((BASE+2)); FG=$((BASE+3)); SSE=$((BASE+4)); FGNA=$((BASE+5)); PINGORA_SSE=$((BASE+6))

for tool in wrk nginx curl python3; do
  command -v $tool >/dev/null || { echo "missing $tool (apt-get install wrk nginx-light curl)"; exit 1; }
done

if [ -z "${FASTGATE:-}" ]; then
  cargo build --release --locked --bin fastgate --example bare_pingora >&2
  FASTGATE=target/release/fastgate
elif [ -z "${BARE:-}" ]; then
  cargo build --release --locked --example bare_pingora >&2
fi
FASTGATE_B=${FASTGATE_B:-}
FGB=$((BASE+7)); FGBNA=$((BASE+8))
BARE=${BARE:-target/release/examples/bare_pingora}

bench_workdir

# --- upstream and nginx proxy (one nginx master each, own prefix) ---
start_json_upstream $UP
mkdir -p "$WORK/px/logs"
cat > "$WORK/px/nginx.conf" <<NGX
daemon off; worker_processes $PROXY_THREADS; pid $WORK/px/nginx.pid; error_log $WORK/px/logs/error.log warn;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  upstream up { server 127.0.0.1:$UP; keepalive 64; }
  server { listen 127.0.0.1:$NGINX reuseport;
    location / { proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; } } }
NGX
nginx -p "$WORK/px" -c "$WORK/px/nginx.conf" & PIDS+=($!)
NGINX_PX_MASTER=$!
python3 benches/sse_upstream.py $SSE & PIDS+=($!)
$BARE 127.0.0.1:$PINGORA 127.0.0.1:$UP $PROXY_THREADS 2>/dev/null & PIDS+=($!)
BARE_PID=$!
# A second bare Pingora in front of the SSE upstream, for time to first byte.
$BARE 127.0.0.1:$PINGORA_SSE 127.0.0.1:$SSE $PROXY_THREADS 2>/dev/null & PIDS+=($!)

# --- FastGate: one instance with the audit log (the default), one without ---
fastgate_instance() { # dir port admin_port audit_enabled
  local dir=$1
  mkdir -p "$dir/routes.d"
  cat > "$dir/fastgate.yaml" <<YML
server: { listen: 127.0.0.1:$2, threads: $PROXY_THREADS }
admin: { listen: 127.0.0.1:$3 }
database: { path: $dir/fg.db }
logging: { level: warn }
audit: { enabled: $4 }
routes_dir: $dir/routes.d
upstreams:
  up: { provider: openai, endpoints: ['http://127.0.0.1:$UP'], key_pool: p }
  # provider http: FastGate leaves the body alone, so Pingora streams it
  # (an openai upstream has its chat bodies read, to ask streams for usage).
  up-plain: { provider: http, endpoints: ['http://127.0.0.1:$UP'], key_pool: p }
  sse: { provider: openai_compatible, endpoints: ['http://127.0.0.1:$SSE'], key_pool: p }
  up-1: { provider: openai, endpoints: ['http://127.0.0.1:$UP'], key_pool: one }
  up-100: { provider: openai, endpoints: ['http://127.0.0.1:$UP'], key_pool: hundred }
key_pools:
  p: { keys: [sk-bench-1, sk-bench-2, sk-bench-3], strategy: round_robin }
  one: { keys: [sk-only-key] }
  hundred: { keys: [$(seq -s, -f 'sk-many-%g' 100)], strategy: least_in_flight }
YML
  cat > "$dir/routes.d/bench.yaml" <<YML
routes:
  - { name: chat, match: { path: /v1/chat/completions, methods: [POST], model: ['gpt-4o*'] }, format: openai, upstream: up }
  - { name: plain, match: { path: /plain/v1/chat/completions }, upstream: up-plain, transform: { strip_prefix: /plain } }
  - { name: sse, match: { path: /sse }, format: openai, upstream: sse }
  - { name: k1, match: { path: /k1/v1/chat/completions, methods: [POST], model: ['gpt-4o*'] }, format: openai, upstream: up-1, transform: { strip_prefix: /k1 } }
  - { name: k100, match: { path: /k100/v1/chat/completions, methods: [POST], model: ['gpt-4o*'] }, format: openai, upstream: up-100, transform: { strip_prefix: /k100 } }
YML
}
fastgate_instance "$WORK/fg" $FG $((BASE+10)) true
fastgate_instance "$WORK/fgna" $FGNA $((BASE+11)) false
create_bench_key "$WORK/fg/fastgate.yaml"
# The same key in the second instance's database.
cp "$WORK/fg/fg.db" "$WORK/fgna/fg.db"
FASTGATE_ADMIN_PASSWORD=bench-admin-password $FASTGATE serve -c "$WORK/fg/fastgate.yaml" >/dev/null 2>"$WORK/fg/log" & PIDS+=($!)
FG_PID=$!
FASTGATE_ADMIN_PASSWORD=bench-admin-password $FASTGATE serve -c "$WORK/fgna/fastgate.yaml" >/dev/null 2>"$WORK/fgna/log" & PIDS+=($!)
FGNA_PID=$!
PORTS="$UP $NGINX $PINGORA $FG $SSE $FGNA $PINGORA_SSE"
if [ -n "$FASTGATE_B" ]; then
  fastgate_instance "$WORK/fgb" $FGB $((BASE+12)) true
  fastgate_instance "$WORK/fgbna" $FGBNA $((BASE+13)) false
  cp "$WORK/fg/fg.db" "$WORK/fgb/fg.db"; cp "$WORK/fg/fg.db" "$WORK/fgbna/fg.db"
  FASTGATE_ADMIN_PASSWORD=bench-admin-password $FASTGATE_B serve -c "$WORK/fgb/fastgate.yaml" >/dev/null 2>"$WORK/fgb/log" & PIDS+=($!)
  FGB_PID=$!
  FASTGATE_ADMIN_PASSWORD=bench-admin-password $FASTGATE_B serve -c "$WORK/fgbna/fastgate.yaml" >/dev/null 2>"$WORK/fgbna/log" & PIDS+=($!)
  FGBNA_PID=$!
  PORTS="$PORTS $FGB $FGBNA"
fi
for p in $PORTS; do wait_port $p; done
sleep 0.5
FG_RSS_IDLE=$(rss_kb $FG_PID)

# CPU ticks (utime+stime) of a process and its children threads / workers.
cpu_ticks() { local t=0; for p in "$@"; do t=$((t + $(awk '{print $14+$15}' /proc/$p/stat))); done; echo $t; }
nginx_px_pids() { echo $NGINX_PX_MASTER $(pgrep -P $NGINX_PX_MASTER); }
HZ=$(getconf CLK_TCK)

declare -A URL PIDSOF
URL[direct]="http://127.0.0.1:$UP/v1/chat/completions"
URL[nginx]="http://127.0.0.1:$NGINX/v1/chat/completions"
URL[pingora]="http://127.0.0.1:$PINGORA/v1/chat/completions"
URL[fastgate]="http://127.0.0.1:$FG/v1/chat/completions"
URL[fg-plain]="http://127.0.0.1:$FG/plain/v1/chat/completions"
URL[fg-noaudit]="http://127.0.0.1:$FGNA/v1/chat/completions"
URL[fg-1key]="http://127.0.0.1:$FG/k1/v1/chat/completions"
URL[fg-100keys]="http://127.0.0.1:$FG/k100/v1/chat/completions"
CONFIGS=(direct nginx pingora fastgate fg-plain fg-noaudit fg-1key fg-100keys)
if [ -n "$FASTGATE_B" ]; then
  URL[b-fastgate]="http://127.0.0.1:$FGB/v1/chat/completions"
  URL[b-fg-noaudit]="http://127.0.0.1:$FGBNA/v1/chat/completions"
  CONFIGS+=(b-fastgate b-fg-noaudit)
fi

# ONLY="fg-noaudit b-fg-noaudit": alternate just these (a focused A/B).
if [ -n "${ONLY:-}" ]; then read -ra CONFIGS <<< "$ONLY"; fi

# Sanity: every configuration answers 200 with the upstream's body.
for c in "${CONFIGS[@]}"; do
  code=$(curl -s -o /dev/null -w '%{http_code}' -X POST -H "Authorization: Bearer $FG_KEY" -H 'content-type: application/json' \
    -d '{"model":"gpt-4o-mini","messages":[]}' "${URL[$c]}")
  [ "$code" = 200 ] || { echo "$c answered $code" >&2; cat "$WORK/fg/log" >&2; exit 1; }
done

declare -A RPS P50 P99 CPU N
FG_RSS_LOAD=0
to_ms() { awk -v v="$1" 'BEGIN { if (v ~ /us$/) {sub(/us/,"",v); print v/1000} else if (v ~ /ms$/) {sub(/ms/,"",v); print v+0} else if (v ~ /s$/) {sub(/s/,"",v); print v*1000} else print v }'; }
settle_audit() { # admin port: until fastgate_audit_written_total holds still for 0.3 s (at most 60 s)
  local prev=-1 cur
  for _ in $(seq 200); do
    cur=$(curl -s "http://127.0.0.1:$1/metrics" | awk '/^fastgate_audit_written_total/ {print $2}')
    [ "$cur" = "$prev" ] && return 0
    prev=$cur; sleep 0.3
  done
}
run_wrk() { # config conns duration -> sets R_RPS R_P50 R_P99 R_REQ R_CPU
  local c=$1 conns=$2 dur=$3 pids
  case $c in nginx) pids=$(nginx_px_pids);; pingora) pids=$BARE_PID;; fastgate|fg-plain|fg-1key|fg-100keys) pids=$FG_PID;; fg-noaudit) pids=$FGNA_PID;; b-fastgate) pids=$FGB_PID;; b-fg-noaudit) pids=$FGBNA_PID;; *) pids="";; esac
  local before=0; [ -n "$pids" ] && before=$(cpu_ticks $pids)
  local out; out=$(wrk -t1 -c"$conns" -d"${dur}s" --latency -s benches/post.lua "${URL[$c]}")
  if [[ $c == fastgate ]]; then local r; r=$(rss_kb $FG_PID); [ "$r" -gt "$FG_RSS_LOAD" ] && FG_RSS_LOAD=$r; fi
  # The audit store's background work for this run counts too: wait until
  # every row is written (the indexer runs at a lower priority and may lag).
  case $c in fastgate|fg-plain|fg-1key|fg-100keys) settle_audit $((BASE+10));; b-fastgate) settle_audit $((BASE+12));; esac
  local after=0; [ -n "$pids" ] && after=$(cpu_ticks $pids)
  R_RPS=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  R_REQ=$(echo "$out" | awk '/requests in/ {print $1}')
  R_P50=$(to_ms "$(echo "$out" | awk '$1=="50%" {print $2}')")
  R_P99=$(to_ms "$(echo "$out" | awk '$1=="99%" {print $2}')")
  local non2xx; non2xx=$(echo "$out" | awk '/Non-2xx/ {print $4}')
  [ -z "$non2xx" ] || { echo "$c: $non2xx non-2xx responses" >&2; exit 1; }
  if [ -n "$pids" ]; then R_CPU=$(awk -v d=$((after-before)) -v hz=$HZ -v n=$R_REQ 'BEGIN {printf "%.1f", d*1e6/hz/n}'); else R_CPU="-"; fi
}

echo "warming up" >&2
for c in "${CONFIGS[@]}"; do run_wrk $c 8 2; done
for r in $(seq "$ROUNDS"); do
  for c in "${CONFIGS[@]}"; do
    run_wrk $c "$CONNS" "$DURATION"
    echo "round $r $c: rps=$R_RPS p50=${R_P50}ms p99=${R_P99}ms cpu=${R_CPU}us/req" >&2
    RPS[$c]="${RPS[$c]:-} $R_RPS"; P50[$c]="${P50[$c]:-} $R_P50"; P99[$c]="${P99[$c]:-} $R_P99"; CPU[$c]="${CPU[$c]:-} $R_CPU"
  done
done
median() { tr ' ' '\n' | grep -v '^$' | grep -v '^-$' | sort -g | awk '{a[NR]=$1} END { if (NR==0) print "-"; else if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2 }'; }

# Added latency at one connection (alternating).
declare -A L1
for r in $(seq "$ROUNDS"); do
  for c in direct fastgate pingora; do run_wrk $c 1 4; L1[$c]="${L1[$c]:-} $R_P50"; done
done

# SSE time to first byte, direct vs through bare Pingora vs through FastGate
# (curl's own timer, a new connection each), alternating.
ttfb() { curl -s -o /dev/null -w '%{time_starttransfer}\n' -X POST -H "Authorization: Bearer $FG_KEY" -H 'content-type: application/json' -d '{"model":"m","stream":true}' "$1"; }
D=(); P=(); F=()
for i in $(seq 150); do
  D+=($(ttfb "http://127.0.0.1:$SSE/v1/chat/completions"))
  P+=($(ttfb "http://127.0.0.1:$PINGORA_SSE/v1/chat/completions"))
  F+=($(ttfb "http://127.0.0.1:$FG/sse"))
done
TTFB_D=$(printf '%s\n' "${D[@]}" | median); TTFB_P=$(printf '%s\n' "${P[@]}" | median); TTFB_F=$(printf '%s\n' "${F[@]}" | median)

{
  echo "### Run $(date -u +%Y-%m-%dT%H:%MZ) — $(nproc) cores, ${DURATION}s x ${ROUNDS} rounds, c$CONNS, proxies with $PROXY_THREADS worker thread(s)"
  echo
  echo "| configuration | RPS (median) | p50 ms | p99 ms | proxy CPU µs/req | RPS vs bare Pingora |"
  echo "|---|---:|---:|---:|---:|---:|"
  PR=$(echo ${RPS[pingora]:-} | median)
  for c in "${CONFIGS[@]}"; do
    rps=$(echo ${RPS[$c]:-} | median)
    ratio=$(awk -v a="$rps" -v b="$PR" 'BEGIN {printf "%.2f", a/b}')
    echo "| $c | $rps | $(echo ${P50[$c]:-} | median) | $(echo ${P99[$c]:-} | median) | $(echo ${CPU[$c]:-} | median) | $ratio |"
  done
  echo
  d1=$(echo ${L1[direct]:-} | median); f1=$(echo ${L1[fastgate]:-} | median); p1=$(echo ${L1[pingora]:-} | median)
  echo "- p50 at 1 connection: direct ${d1} ms, bare Pingora ${p1} ms, FastGate ${f1} ms → FastGate adds $(awk -v a=$f1 -v b=$d1 'BEGIN{printf "%.3f", a-b}') ms over direct"
  echo "- SSE time to first byte (median of 150, curl, new connection each): direct $(awk -v v=$TTFB_D 'BEGIN{printf "%.3f", v*1000}') ms, bare Pingora $(awk -v v=$TTFB_P 'BEGIN{printf "%.3f", v*1000}') ms, FastGate $(awk -v v=$TTFB_F 'BEGIN{printf "%.3f", v*1000}') ms → FastGate adds $(awk -v a=$TTFB_F -v b=$TTFB_D 'BEGIN{printf "%.3f", (a-b)*1000}') ms over direct, $(awk -v a=$TTFB_F -v b=$TTFB_P 'BEGIN{printf "%.3f", (a-b)*1000}') ms over bare Pingora"
  echo "- FastGate RSS: idle $((FG_RSS_IDLE/1024)) MiB, under load $((FG_RSS_LOAD/1024)) MiB"
  FA=$(echo ${RPS[fastgate]:-} | median); FN=$(echo ${RPS[fg-noaudit]:-} | median)
  echo "- Audit log on vs off (same route, same run): $(awk -v a=$FA -v b=$FN 'BEGIN{printf "%.2f", a/b}') × RPS"
  K1=$(echo ${RPS[fg-1key]:-} | median); K100=$(echo ${RPS[fg-100keys]:-} | median)
  echo "- Key pool of 100 keys vs 1 key (same route shape, same run): $(awk -v a=$K100 -v b=$K1 'BEGIN{printf "%.2f", a/b}') × RPS"
  if [ -n "$FASTGATE_B" ]; then
    BA=$(echo ${RPS[b-fastgate]:-} | median); BN=$(echo ${RPS[b-fg-noaudit]:-} | median)
    CA=$(echo ${CPU[fastgate]:-} | median); CBA=$(echo ${CPU[b-fastgate]:-} | median)
    CN=$(echo ${CPU[fg-noaudit]:-} | median); CBN=$(echo ${CPU[b-fg-noaudit]:-} | median)
    echo "- A/B: A = $FASTGATE ($($FASTGATE version)), B = $FASTGATE_B ($($FASTGATE_B version))"
    echo "  - audit on: B/A $(awk -v a=$BA -v b=$FA 'BEGIN{printf "%.3f", a/b}') × RPS, CPU per request A ${CA} µs, B ${CBA} µs"
    echo "  - audit off: B/A $(awk -v a=$BN -v b=$FN 'BEGIN{printf "%.3f", a/b}') × RPS, CPU per request A ${CN} µs, B ${CBN} µs"
  fi
  ROWS=$(python3 -c "import sqlite3; print(sqlite3.connect('$WORK/fg/fg.db').execute('select count(*) from audit_log').fetchone()[0])")
  echo "- Audit rows written during the run: $ROWS (dropped: $(curl -s http://127.0.0.1:$((BASE+10))/metrics | awk '/^fastgate_audit_dropped_total/ {print $2}'))"
} | tee "$OUT"
