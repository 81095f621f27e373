#!/usr/bin/env bash
# What the test suite needs that a fresh Debian machine lacks, installed
# once (each is checked first, so a second run installs nothing):
#   cmake            building (a C dependency of Pingora builds with it)
#   redis-server     cluster tests (Redis >= 7: server-side functions)
#   postgresql       cluster tests (>= 15; started by the harness as `postgres`)
#   chromium         the web UI's end-to-end test (Debian's, no browser download)
#   systemd, util-linux  the deployment-file check (systemd-analyze, unshare)
#   cargo-nextest    the test runner
# Used by the README's test command (tests/all.sh) and by CI (.ci/run).
set -euo pipefail

need_apt=()
command -v cmake >/dev/null 2>&1 || need_apt+=(cmake)
command -v systemd-analyze >/dev/null 2>&1 || need_apt+=(systemd)
command -v unshare >/dev/null 2>&1 || need_apt+=(util-linux)
[ -x /usr/bin/chromium ] || need_apt+=(chromium)
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || need_apt+=(postgresql)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "tests/prereqs.sh: installing ${need_apt[*]}" >&2
  sudo=()
  [ "$(id -u)" -eq 0 ] || sudo=(sudo)
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get update -qq
  "${sudo[@]}" apt-get install -y -qq "${need_apt[@]}"
fi
if ! cargo nextest --version >/dev/null 2>&1; then
  cargo install --locked cargo-nextest
fi
command -v npm >/dev/null 2>&1 || { echo "tests/prereqs.sh: Node.js 20 (npm) is needed for the web UI and Codex CLI tests" >&2; exit 1; }
python3 -c 'import venv' 2>/dev/null || { echo "tests/prereqs.sh: python3 with venv is needed for the SDK tests" >&2; exit 1; }
