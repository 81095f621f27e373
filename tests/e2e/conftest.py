"""Start the mock providers and the real fastgate binary (built by cargo)
with one route per client format x upstream provider."""

import os
import pathlib
import socket
import subprocess
import tempfile
import time

import pytest

import mock_providers

ROOT = pathlib.Path(__file__).resolve().parents[2]
FORMATS = ["openai", "anthropic", "gemini"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listens_on(pid, port):
    """Whether process `pid` holds the socket listening on 127.0.0.1:`port`.

    Another process may hold a port this one failed to bind, so a connect
    alone does not prove the gateway under test is up.
    """
    local = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as table:
        inodes = {
            f"socket:[{f[9]}]"
            for f in (line.split() for line in list(table)[1:])
            if len(f) > 9 and f[1] == local and f[3] == "0A"
        }
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                return True
        except OSError:
            pass
    return False


def binary():
    target = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    path = target / "debug" / "fastgate"
    if not path.exists():
        subprocess.run(["cargo", "build", "--locked", "--bin", "fastgate"], cwd=ROOT, check=True)
    return path


def routes():
    lines = ["routes:"]
    for client in FORMATS:
        for up in FORMATS:
            prefix = f"/{client}-{up}"
            path = {"openai": "/v1/{*rest}", "anthropic": "/v1/{*rest}", "gemini": "/v1beta/{*rest}"}[client]
            lines.append(
                f"  - {{ name: {client}-{up}, match: {{ path: '{prefix}{path}' }}, format: {client}, auth: none, "
                f"upstream: {up}, retries: 1, model_map: {{ alias-model: mock-model }}, "
                f"transform: {{ strip_prefix: {prefix} }} }}"
            )
    # The Responses API (Codex CLI) toward each provider: OpenAI's through
    # Chat Completions (an openai_compatible upstream; provider `openai`
    # would pass through to its own /v1/responses).
    for up in FORMATS:
        target = "openai-chat" if up == "openai" else up
        lines.append(
            f"  - {{ name: responses-{up}, match: {{ path: '/responses-{up}/v1/{{*rest}}' }}, format: responses, auth: none, "
            f"upstream: {target}, model_map: {{ alias-model: mock-model }}, transform: {{ strip_prefix: /responses-{up} }} }}"
        )
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="session")
def gateway():
    mock = mock_providers.start()
    up = f"http://127.0.0.1:{mock.server_address[1]}"
    work = tempfile.TemporaryDirectory()
    d = pathlib.Path(work.name)
    (d / "routes.d").mkdir()
    (d / "routes.d" / "e2e.yaml").write_text(routes())
    for _ in range(5):
        port, admin = free_port(), free_port()
        (d / "fastgate.yaml").write_text(
            f"""server: {{ listen: 127.0.0.1:{port}, threads: 2 }}
admin: {{ listen: 127.0.0.1:{admin} }}
database: {{ path: {d}/fg.db }}
routes_dir: {d}/routes.d
upstreams:
  # The mock model reasons when asked (as o3 or gpt-5 do): the upstream's
  # own capability rule says so (the shipped table knows only real models).
  openai: {{ provider: openai, endpoints: ['{up}'], key_pool: po, capabilities: [{{ match: 'mock-*', reasoning: true }}] }}
  openai-chat: {{ provider: openai_compatible, endpoints: ['{up}'], key_pool: po }}
  anthropic: {{ provider: anthropic, endpoints: ['{up}'], key_pool: pa }}
  gemini: {{ provider: gemini, endpoints: ['{up}'], key_pool: pg }}
key_pools:
  po: {{ keys: [sk-openai-upstream] }}
  pa: {{ keys: [sk-ant-upstream] }}
  pg: {{ keys: [AIza-gemini-upstream] }}
"""
        )
        log = open(d / "fastgate.log", "w")
        proc = subprocess.Popen(
            [str(binary()), "serve", "-c", str(d / "fastgate.yaml")],
            stdout=subprocess.DEVNULL,
            stderr=log,
            env=dict(os.environ, FASTGATE_ADMIN_PASSWORD="e2e-admin-password"),
        )
        deadline = time.time() + 20
        while time.time() < deadline and proc.poll() is None:
            if listens_on(proc.pid, port) and listens_on(proc.pid, admin):
                break
            time.sleep(0.05)
        if proc.poll() is None and listens_on(proc.pid, port):
            break
        proc.kill()
        proc.wait()
    else:
        raise RuntimeError((d / "fastgate.log").read_text())
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=10)
    mock.shutdown()
    work.cleanup()
