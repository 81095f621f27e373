# Shared pieces of the benchmark scripts (sourced, not run). Each script
# sets `set -euo pipefail` and cds to the repository root first.

# A scratch directory ($WORK) and the processes to stop ($PIDS) on exit.
bench_workdir() {
  WORK=$(mktemp -d)
  PIDS=()
  trap bench_cleanup EXIT
}
# BENCH_LOGS=dir keeps each FastGate instance's log there (as <instance>.log).
bench_cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; sleep 0.3
  if [ -n "${BENCH_LOGS:-}" ]; then
    mkdir -p "$BENCH_LOGS"
    for l in "$WORK"/*/log; do [ -f "$l" ] && cp "$l" "$BENCH_LOGS/$(basename "$(dirname "$l")").log"; done
  fi
  rm -rf "$WORK"
}

wait_port() { for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; exit 1; }

rss_kb() { awk '/VmRSS/ {print $2}' /proc/$1/status; }

# nginx answering every request at once with a small OpenAI chat completion
# (the upstream of the load runs), in $WORK/up, on 127.0.0.1:PORT.
start_json_upstream() { # port
  mkdir -p "$WORK/up/logs"
  cat > "$WORK/up/nginx.conf" <<NGX
daemon off; worker_processes 1; pid $WORK/up/nginx.pid; error_log $WORK/up/logs/error.log warn;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:$1 reuseport;
    location / { default_type application/json;
      return 200 '{"id":"c1","object":"chat.completion","model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"Hello"},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":1,"total_tokens":13}}'; } } }
NGX
  nginx -p "$WORK/up" -c "$WORK/up/nginx.conf" & PIDS+=($!)
}

# A FastGate config in DIR with one worker thread and an upstream `up`
# (PROVIDER at UPSTREAM_PORT, a pool of three keys) behind a model-routed
# chat route. Extra top-level YAML (e.g. `audit: ...`) may come sixth.
fastgate_bench_config() { # dir port admin_port provider upstream_port [extra]
  mkdir -p "$1/routes.d"
  cat > "$1/fastgate.yaml" <<YML
server: { listen: 127.0.0.1:$2, threads: 1 }
admin: { listen: 127.0.0.1:$3 }
database: { path: $1/fg.db }
logging: { level: warn }
routes_dir: $1/routes.d
${6:-}
upstreams:
  up: { provider: $4, endpoints: ['http://127.0.0.1:$5'], key_pool: p }
key_pools:
  p: { keys: [sk-bench-1, sk-bench-2, sk-bench-3], strategy: round_robin }
YML
  cat > "$1/routes.d/bench.yaml" <<YML
routes:
  - { name: chat, match: { path: /v1/chat/completions, methods: [POST], model: ['gpt-4o*'] }, format: openai, upstream: up }
YML
}

# A gateway key in the database of CONFIG, exported as FG_KEY (benches/post.lua reads it).
create_bench_key() { # config
  FG_KEY=$(${FASTGATE:-target/release/fastgate} keys -c "$1" create --name bench --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["secret"])')
  export FG_KEY
}
