#!/usr/bin/env python3
"""The shipped deployment files, checked as shipped.

systemd/fastgate.service: its hardening is scored by `systemd-analyze
security --offline`; then the unit's file-system rules are reproduced in a
private mount namespace (the layout its install comment gives, everything
read-only but ReadWritePaths= and StateDirectory= as ProtectSystem=strict
makes it, a private /tmp, the unit's User's files) and its ExecStartPre= and
ExecStart= lines run as an unprivileged user with its Environment= and
WorkingDirectory=.

Dockerfile: the runtime image's layout (its COPY lines with their --chown,
its ENV, WORKDIR, USER and CMD) is laid out the same way and run.

In both, a route is created and edited through the admin API (written to
routes.d) and served by the data plane, and the admin port must be
reachable where the file says it is. docker-compose.yml is checked for the
admin port published to the host's loopback only and a Prometheus job
scraping it.

Run as root (mount namespaces): python3 tests/deploy/check.py [BINARY]
"""

import json
import os
import pathlib
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[2]
SERVICE_UID = 61234  # an unprivileged uid that owns nothing on the host
PASSWORD = "deploy-check-password"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sh(*args):
    subprocess.run(args, check=True)


def unit_service_settings(path):
    """The [Service] section as {key: [values]} (repeated keys kept)."""
    settings, section = {}, None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]" and "=" in line:
            k, v = line.split("=", 1)
            settings.setdefault(k, []).append(v)
    return settings


def request(method, url, body=None, token=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("content-type", "application/json")
    if token:
        req.add_header("authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def wait_port(port, proc, log):
    deadline = time.time() + 30
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"fastgate exited ({proc.returncode}):\n{log.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"port {port} never opened:\n{log.read_text()}")


def indexer_scheduling(pid):
    """(policy, nice) of the process's `audit-indexer` thread."""
    for task in pathlib.Path(f"/proc/{pid}/task").iterdir():
        if (task / "comm").read_text().strip() == "audit-indexer":
            rest = (task / "stat").read_text().rsplit(")", 1)[1].split()
            return int(rest[38]), int(rest[16])  # fields 41 and 19
    raise AssertionError(f"no audit-indexer thread in {pid}")


SCHED_OTHER, SCHED_IDLE = 0, 5


def exercise(name, argv, env, cwd, uid, data_port, admin_port, routes_dir, nice_limit=None):
    """Run fastgate as `uid` (with RLIMIT_NICE `nice_limit`, as the unit's
    LimitNICE= sets it), edit a route through the admin API, use it."""
    log = pathlib.Path(tempfile.mkdtemp(prefix="fg-deploy-")) / "fastgate.log"
    cmd = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"] + argv
    if nice_limit is not None:
        if subprocess.run(["prlimit", f"--nice={nice_limit}:{nice_limit}", "--", "true"],
                          stderr=subprocess.DEVNULL).returncode != 0:
            print(f"note: {name}: RLIMIT_NICE cannot be raised here (no CAP_SYS_RESOURCE); run without LimitNICE=")
            nice_limit = None
        else:
            cmd = ["prlimit", f"--nice={nice_limit}:{nice_limit}", "--"] + cmd
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_port(admin_port, proc, log)
        wait_port(data_port, proc, log)
        admin = f"http://127.0.0.1:{admin_port}"
        status, body = request("POST", f"{admin}/api/auth/login", {"username": "admin", "password": PASSWORD})
        assert status == 200, f"{name}: login {status} {body}"
        token = json.loads(body)["token"]
        route = {
            "name": "deploy-check",
            "match": {"path": "/deploy-check/{*rest}"},
            "auth": "none",
            "upstream": "mock",
            "transform": {"strip_prefix": "/deploy-check"},
        }
        status, body = request("POST", f"{admin}/api/routes", route, token)
        assert status == 201, f"{name}: creating a route through the admin API: {status} {body}\n{log.read_text()}"
        route["enabled"] = False
        status, body = request("PUT", f"{admin}/api/routes/deploy-check", route, token)
        assert status == 200, f"{name}: editing the route: {status} {body}"
        status, body = request("POST", f"{admin}/api/routes/deploy-check/toggle", None, token)
        assert status == 200, f"{name}: toggling the route: {status} {body}"
        files = [p for p in routes_dir.iterdir() if "deploy-check" in p.read_text()]
        assert files, f"{name}: the route edit did not reach {routes_dir}"
        chat = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
        deadline = time.time() + 10
        while True:
            status, body = request("POST", f"http://127.0.0.1:{data_port}/deploy-check/v1/chat/completions", chat)
            if status == 200 or time.time() > deadline:
                break
            time.sleep(0.1)
        assert status == 200, f"{name}: the edited route is not served: {status} {body}"
        status, body = request("GET", f"{admin}/health/ready")
        assert status == 200, f"{name}: not ready: {status} {body}"
        print(f"ok: {name}: route created, edited and served; database and routes.d writable as shipped")
        # The audit indexer may leave SCHED_IDLE (for nice 10, when behind)
        # only with RLIMIT_NICE >= 10; without, it stays at nice 10.
        policy, nice = indexer_scheduling(proc.pid)
        want = SCHED_IDLE if nice_limit is not None and int(nice_limit) >= 10 else SCHED_OTHER
        assert (policy, nice) == (want, 10), f"{name}: audit indexer policy {policy}, nice {nice}; want {want}, 10"
        print(f"ok: {name}: audit indexer {'SCHED_IDLE' if want == SCHED_IDLE else 'nice 10'} as an unprivileged user")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert proc.returncode == 0, f"{name}: did not drain and exit 0 on SIGTERM ({proc.returncode}):\n{log.read_text()}"


def mount_tmpfs(path):
    path.mkdir(parents=True, exist_ok=True)
    sh("mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", str(path))


def inside_systemd(binary):
    """In a private mount namespace: the unit's layout and rules, then run it."""
    unit = ROOT / "systemd" / "fastgate.service"
    s = unit_service_settings(unit)
    user = s.get("User", ["a DynamicUser"])[0]
    state = pathlib.Path("/var/lib") / s["StateDirectory"][0]
    etc = pathlib.Path("/etc/fastgate")
    for path in (etc, state, pathlib.Path("/usr/local/bin")):
        mount_tmpfs(path)
    # The layout the unit's install comment gives.
    shutil.copy(binary, "/usr/local/bin/fastgate")
    shutil.copy(ROOT / "conf" / "fastgate.yaml", etc / "fastgate.yaml")
    routes = etc / "routes.d"
    shutil.copytree(ROOT / "routes.d", routes)
    for p in [routes, *routes.iterdir()]:
        os.chown(p, SERVICE_UID, SERVICE_UID)
    os.chown(state, SERVICE_UID, SERVICE_UID)  # StateDirectory=
    os.chmod(state, int(s.get("StateDirectoryMode", ["0755"])[0], 8))
    # ProtectSystem=strict: all read-only but ReadWritePaths= and the state
    # directory; PrivateTmp=: a /tmp of its own.
    writable = [pathlib.Path(p) for v in s.get("ReadWritePaths", []) for p in v.split()] + [state]
    for p in writable:
        sh("mount", "--bind", str(p), str(p))
    if s.get("PrivateTmp", ["no"])[0] == "yes":
        mount_tmpfs(pathlib.Path("/tmp"))
    for ro in ("/", str(etc), "/usr/local/bin"):
        sh("mount", "-o", "remount,bind,ro", ro)
    data_port, admin_port = free_port(), free_port()
    env = {"PATH": "/usr/bin:/bin"}
    for line in s.get("Environment", []):
        for pair in shlex.split(line):
            k, v = pair.split("=", 1)
            env[k] = v
    env.update(
        FASTGATE_LISTEN=f"127.0.0.1:{data_port}",
        FASTGATE_ADMIN_LISTEN=f"127.0.0.1:{admin_port}",
        FASTGATE_ADMIN_PASSWORD=PASSWORD,
    )
    uid = SERVICE_UID
    print(f"systemd: {user} as uid {uid}; writable: {', '.join(map(str, writable))}")
    check = shlex.split(s["ExecStartPre"][0])
    r = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"] + check,
                       env=env, cwd=s["WorkingDirectory"][0], capture_output=True, text=True)
    assert r.returncode == 0, f"systemd: ExecStartPre failed: {r.stdout}{r.stderr}"
    exercise("systemd", shlex.split(s["ExecStart"][0]), env, s["WorkingDirectory"][0], uid,
             data_port, admin_port, routes, s.get("LimitNICE", [None])[0])


def dockerfile_runtime_stage(path):
    """The last stage's instructions as (keyword, argument) pairs."""
    text = re.sub(r"\\\n", " ", path.read_text())
    stages, current = [], []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, arg = line.partition(" ")
        if word.upper() == "FROM":
            current = []
            stages.append(current)
        current.append((word.upper(), arg.strip()))
    return stages[-1]


def inside_docker(binary):
    stage = dockerfile_runtime_stage(ROOT / "Dockerfile")
    env, workdir, user, cmd, entrypoint = {"PATH": "/usr/local/bin:/usr/bin:/bin"}, "/", None, [], []
    uid = 10001
    homes = []
    for word, arg in stage:
        if word == "RUN" and "useradd" in arg:
            m = re.search(r"--uid (\d+)", arg)
            uid = int(m.group(1)) if m else uid
            h = re.search(r"--home-dir (\S+)", arg)
            if h and "--create-home" in arg:
                homes.append(pathlib.Path(h.group(1)))
        elif word == "ENV":
            for pair in shlex.split(arg):
                k, v = pair.split("=", 1)
                env[k] = v
        elif word == "WORKDIR":
            workdir = arg
        elif word == "USER":
            user = arg
        elif word == "CMD":
            cmd = json.loads(arg)
        elif word == "ENTRYPOINT":
            entrypoint = json.loads(arg)
    assert user and user != "root", "the image must not run as root"
    mounted = set()

    def fresh(path):
        # One tmpfs per top-level destination (the image's own file system).
        top = pathlib.Path(*path.parts[:3]) if len(path.parts) > 3 else path
        if top not in mounted:
            mount_tmpfs(top)
            mounted.add(top)
        path.mkdir(parents=True, exist_ok=True)

    for home in homes:
        fresh(home)
        os.chown(home, uid, uid)
    routes_dir = None
    for word, arg in stage:
        if word != "COPY":
            continue
        parts = shlex.split(arg)
        chown = next((p.split("=", 1)[1] for p in parts if p.startswith("--chown=")), None)
        srcs = [p for p in parts if not p.startswith("--")]
        src, dst = srcs[0], pathlib.Path(srcs[-1])
        if any(p.startswith("--from=") for p in parts):
            fresh(dst.parent)
            shutil.copy(binary, dst)
            continue
        fresh(dst.parent)
        shutil.copytree(ROOT / src, dst, dirs_exist_ok=True)
        if chown:
            for p in [dst, *dst.rglob("*")]:
                os.chown(p, uid, uid)
        if src == "routes.d":
            routes_dir = dst
    assert routes_dir, "the image ships routes.d"
    admin = env.get("FASTGATE_ADMIN_LISTEN", "127.0.0.1:9090")
    assert not admin.startswith("127."), (
        f"the admin service listens on {admin} inside the container: unreachable through a published port")
    data_port, admin_port = free_port(), free_port()
    # The container's ports, moved to free loopback ports for this check.
    env["FASTGATE_LISTEN"] = f"127.0.0.1:{data_port}"
    env["FASTGATE_ADMIN_LISTEN"] = f"127.0.0.1:{admin_port}"
    env["FASTGATE_ADMIN_PASSWORD"] = PASSWORD
    # A container's file system is writable: what the user may change is
    # decided by ownership alone, as laid out above.
    print(f"docker: user {user} (uid {uid}), ENV {sorted(k for k in env if k.startswith('FASTGATE'))}")
    exercise("docker", entrypoint + cmd, env, workdir, uid, data_port, admin_port, routes_dir)


def check_compose():
    try:
        import yaml
    except ImportError:
        raise SystemExit("PyYAML is needed for the compose check (pip install pyyaml)")
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    fg = compose["services"]["fastgate"]
    admin_ports = [p for p in fg["ports"] if str(p).endswith(":9090")]
    assert admin_ports and all(str(p).startswith("127.0.0.1:") for p in admin_ports), (
        f"the admin port must be published to the host's loopback only: {fg['ports']}")
    prom = compose["services"]["prometheus"]
    config_mount = next(v for v in prom["volumes"] if "prometheus.yml" in v)
    prom_cfg = yaml.safe_load((ROOT / config_mount.split(":")[0]).read_text())
    targets = [t for job in prom_cfg["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert "fastgate:9090" in targets, f"Prometheus does not scrape fastgate's admin port: {targets}"
    print("ok: docker-compose.yml: admin port on the host's loopback; Prometheus scrapes fastgate:9090")


def check_cluster_compose(binary):
    import yaml
    compose = yaml.safe_load((ROOT / "docker-compose.cluster.yml").read_text())
    services = compose["services"]
    nodes = {name: svc for name, svc in services.items() if name.startswith("node-")}
    assert len(nodes) == 3, f"three nodes: {sorted(services)}"
    ids = set()
    for name, svc in nodes.items():
        env = svc["environment"]
        admin = [p for p in svc["ports"] if str(p).endswith(":9090")]
        assert admin and all(str(p).startswith("127.0.0.1:") for p in admin), f"{name}: admin port on loopback only"
        host = env["FASTGATE_REDIS_URL"].split("//", 1)[1].split(":", 1)[0]
        assert host in services, f"{name}: FASTGATE_REDIS_URL names no service: {host}"
        ids.add(env["FASTGATE_NODE_ID"])
        # The shipped config, with this node's environment, is valid.
        run_env = {k: str(v) for k, v in env.items() if "${" not in str(v)}
        r = subprocess.run([binary, "check", "-c", str(ROOT / "conf" / "fastgate.yaml")], cwd=ROOT,
                           env={**os.environ, **run_env}, capture_output=True, text=True)
        assert r.returncode == 0, f"{name}: fastgate check: {r.stdout}{r.stderr}"
    assert len(ids) == 3, f"node ids must differ: {ids}"
    print("ok: docker-compose.cluster.yml: three nodes on one Redis, distinct ids, admin ports on loopback, config valid")


def main():
    if len(sys.argv) > 2 and sys.argv[1] == "--inside":
        {"systemd": inside_systemd, "docker": inside_docker}[sys.argv[2]](sys.argv[3])
        return
    binary = sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "target" / "debug" / "fastgate")
    unit = ROOT / "systemd" / "fastgate.service"
    r = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--threshold=20", str(unit)],
                       capture_output=True, text=True)
    score = next((l for l in r.stdout.splitlines() if "Overall exposure level" in l), r.stdout + r.stderr)
    assert r.returncode == 0, f"systemd hardening above 2.0: {score}"
    print(f"ok: systemd-analyze security: {score.strip()}")
    # Mount points made inside the namespaces are directories on the host:
    # remove the ones this check created.
    created = [p for p in map(pathlib.Path, ("/etc/fastgate", "/var/lib/fastgate")) if not p.exists()]
    try:
        for which in ("systemd", "docker"):
            subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable, __file__,
                            "--inside", which, binary], check=True)
    finally:
        for p in created:
            shutil.rmtree(p, ignore_errors=True)
    check_compose()
    check_cluster_compose(binary)


if __name__ == "__main__":
    main()
