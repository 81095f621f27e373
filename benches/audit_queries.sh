#!/bin/bash
# Admin API query times over N audit rows spread over the last 24 h (default
# 10 M, about 3.3 GB and 5 min to fill): the newest 100 rows, filtered pages,
# and the 24 h stats. Best of 3 each. Needs a release build, curl, bc, python3.
#   BIN=target/release/fastgate N=10000000 bash benches/audit_queries.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/fastgate}; N=${N:-10000000}; D=${D:-$PWD/target/audit-queries}
rm -rf $D; mkdir -p $D/routes.d
cat > $D/fastgate.yaml <<YML
server: { listen: 127.0.0.1:18401 }
admin: { listen: 127.0.0.1:18402 }
database: { path: $D/fg.db }
logging: { level: warn }
routes_dir: $D/routes.d
audit: { max_bytes: 0 }
YML
start() { FASTGATE_ADMIN_PASSWORD=bench-admin-password $BIN serve -c $D/fastgate.yaml >/dev/null 2>$D/log & PID=$!; for _ in $(seq 300); do curl -s -o /dev/null http://127.0.0.1:18402/health/live && return; sleep 0.1; done; echo never up; cat $D/log; exit 1; }
start; kill $PID; wait $PID || true
python3 benches/audit_fill.py $D/fg.db $N | tail -2
ls -la $D/fg.db
start
TOKEN=$(curl -s http://127.0.0.1:18402/api/auth/login -H 'content-type: application/json' -d '{"username":"admin","password":"bench-admin-password"}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
t() { local best=999; for i in 1 2 3; do s=$(date +%s.%N); curl -s -o $D/out -w '' -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:18402$1"; e=$(date +%s.%N); v=$(echo "$e - $s" | bc); best=$(echo "if ($v < $best) $v else $best" | bc); done; echo "$1: best of 3 ${best} s ($(head -c 120 $D/out))"; }
t "/api/logs?limit=100"
t "/api/logs?limit=100&key_id=key_0042"
t "/api/logs?limit=100&route=embed&status=500"
t "/api/stats/summary?window=24h"
t "/api/stats/timeseries?bucket=hour&window=24h"
t "/api/stats/top?by=model&window=24h"
t "/api/stats/summary?window=24h&key_id=key_0042"
kill $PID; wait $PID || true
