#!/usr/bin/env bash
# End-to-end tests with the official OpenAI, Anthropic and Gemini SDKs
# (pinned in requirements.txt) against the real binary: every SDK x every
# provider. Creates target/e2e-venv on first use.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=$(realpath -m "${E2E_VENV:-target/e2e-venv}")
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c 'import sys, importlib.metadata as m; want = dict(l.split("==") for l in open("tests/e2e/requirements.txt") if "==" in l and not l.startswith("#")); sys.exit(any(m.version(k) != v for k, v in want.items()))' 2>/dev/null; then
  "$VENV/bin/pip" install --quiet --disable-pip-version-check -r tests/e2e/requirements.txt
fi
# Codex CLI from the npm registry (a binary package), for test_codex.py.
CODEX_VERSION=0.171.0
if command -v npm >/dev/null; then
  if [ "$("$VENV/codex/node_modules/.bin/codex" --version 2>/dev/null)" != "codex-cli $CODEX_VERSION" ]; then
    npm install --silent --no-audit --no-fund --prefix "$VENV/codex" "@openai/codex@$CODEX_VERSION" >/dev/null
  fi
  export CODEX_BIN="$VENV/codex/node_modules/.bin/codex"
fi
# The google-genai SDK's own chat carrying Claude's signed thinking across a
# tool call (it re-encodes the thoughtSignature bytes). Building this test
# also builds target/debug/fastgate, which conftest.py starts: the same
# build `cargo nextest run` makes (`cargo build --bin` alone would resolve
# other dependency features and compile Pingora a second time).
GENAI_PYTHON="$VENV/bin/python" cargo nextest run --locked --test gemini_thinking_signatures --run-ignored only
cd tests/e2e
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
