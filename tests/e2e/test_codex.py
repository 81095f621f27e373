"""Codex CLI itself (`codex exec`, from the npm registry; run.sh installs the
pinned version and sets CODEX_BIN) through FastGate's Responses API toward
each provider: a turn with a shell call that Codex runs, its output sent
back, and the final answer, all through converted streams."""

import json
import os
import pathlib
import subprocess
import tempfile

import pytest

import mock_providers

CODEX = os.environ.get("CODEX_BIN", "")
UPSTREAM_PATH = {"openai": "/v1/chat/completions", "anthropic": "/v1/messages", "gemini": "/v1beta/models/mock-model:"}

pytestmark = pytest.mark.skipif(not (CODEX and pathlib.Path(CODEX).exists()),
                                reason="Codex CLI not installed (run.sh installs it with npm)")


@pytest.mark.parametrize("up", ["openai", "anthropic", "gemini"])
def test_codex_exec_runs_a_command_through_every_provider(gateway, up):
    with tempfile.TemporaryDirectory() as d:
        home, work = pathlib.Path(d, "codex-home"), pathlib.Path(d, "work")
        home.mkdir()
        work.mkdir()
        (home / "config.toml").write_text(f'''model = "mock-model"
model_provider = "fastgate"

[model_providers.fastgate]
name = "FastGate"
base_url = "{gateway}/responses-{up}/v1"
env_key = "FASTGATE_KEY"
wire_api = "responses"
''')
        before = len(mock_providers.SEEN)
        r = subprocess.run([CODEX, "exec", "--skip-git-repo-check", "--json", "Run the check."],
                           cwd=work, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL,
                           env=dict(os.environ, CODEX_HOME=str(home), FASTGATE_KEY="client-key"))
    assert r.returncode == 0, r.stderr[-3000:]
    events = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    done = [e["item"] for e in events if e["type"] == "item.completed"]
    ran = [i for i in done if i["type"] == "command_execution"]
    assert ran and ran[0]["exit_code"] == 0 and "codex-ran-42" in ran[0]["aggregated_output"], events
    answer = [i["text"] for i in done if i["type"] == "agent_message"]
    assert answer and "codex-ran-42" in answer[-1], events
    usage = next(e["usage"] for e in events if e["type"] == "turn.completed")
    assert usage["input_tokens"] > 0 and usage["output_tokens"] > 0, usage
    # Two model calls reached the upstream in its own format: the call, then
    # the command's output tied to it.
    seen = [s for s in mock_providers.SEEN[before:] if s["body"] is not None]
    assert len(seen) == 2 and all(s["path"].startswith(UPSTREAM_PATH[up]) for s in seen), [s["path"] for s in seen]
    assert "codex-ran-42" in json.dumps(seen[-1]["body"])
