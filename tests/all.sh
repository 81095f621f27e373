#!/usr/bin/env bash
# The whole test suite (the README's second command): installs what the
# machine lacks (tests/prereqs.sh), then the Rust tests, the official SDKs
# and Codex CLI end to end, and the web UI's unit and browser tests. Every
# step uses the one debug build `cargo nextest run` makes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/prereqs.sh
cargo nextest run --locked
bash tests/e2e/run.sh
FASTGATE_BIN="$(realpath "${CARGO_TARGET_DIR:-target}")/debug/fastgate"
(cd admin-ui && npm ci --no-audit --no-fund --loglevel=error && npm test --silent && FASTGATE_BIN="$FASTGATE_BIN" npm run --silent e2e)
