"""`ldm stack up | down | status`: the local stack on 127.0.0.1, each service a process group this command owns.

Prefect server (SQLite) and a process worker, an MLflow tracking server (SQLite + local artifacts), a Ray
head with its dashboard (token auth) and a moto S3 server. Pids, logs and state live under the stack
folder (`.stack/`); `down` stops exactly the process groups `up` started, and nothing else.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
POOL = "local-process"  # the process work pool train-ldm/local runs on (prefect.yaml names it)
PROD_POOL = "k8s-gpu"  # train-ldm/prod's Kubernetes pool
# Ports users open; Ray's internal ports are picked free at `up` so two clusters never share one.
DEFAULT_PORTS = {"prefect": 4200, "mlflow": 5000, "ray": 8265, "s3": 9000}
RAY_INTERNAL = ("gcs", "client", "agent_listen", "agent_grpc", "metrics", "runtime_env", "node_manager", "object")
FAKE_S3_KEYS = {"AWS_ACCESS_KEY_ID": "stack", "AWS_SECRET_ACCESS_KEY": "stack", "AWS_DEFAULT_REGION": "us-east-1"}
BUCKET = "my-bucket"  # created on the stack's S3 by `up`: the bucket the README's example writes to


class StackError(RuntimeError):
    """A stack problem the user can fix (a port taken, a service that did not come up): one line."""


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_taken(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def parse_ports(spec: str | None) -> dict[str, int]:
    """The service ports: defaults, then LDM_STACK_PORTS, then --ports (`name=port,...`)."""
    ports = dict(DEFAULT_PORTS)
    for text in (os.environ.get("LDM_STACK_PORTS"), spec):
        for item in filter(None, (text or "").split(",")):
            name, _, value = item.partition("=")
            if name.strip() not in ports or not value.strip().isdigit():
                raise StackError(f"--ports: {item!r} is not NAME=PORT with NAME one of {', '.join(ports)}")
            ports[name.strip()] = int(value)
    return ports


def urls(ports: dict[str, int]) -> dict[str, str]:
    """Every URL the stack serves."""
    return {
        "prefect": f"http://127.0.0.1:{ports['prefect']}",
        "mlflow": f"http://127.0.0.1:{ports['mlflow']}",
        "ray": f"http://127.0.0.1:{ports['ray']}",
        "s3": f"http://127.0.0.1:{ports['s3']}",
    }


def client_env(state: dict) -> dict[str, str]:
    """The environment that points a process at the stack: Prefect API, Ray (with its token), MLflow, S3."""
    u = state["urls"]
    return {
        "PREFECT_API_URL": f"{u['prefect']}/api",
        "RAY_ADDRESS": u["ray"],
        "RAY_AUTH_TOKEN_PATH": state["ray_token_path"],
        "MLFLOW_TRACKING_URI": u["mlflow"],
        "AWS_ENDPOINT_URL": u["s3"],
        **FAKE_S3_KEYS,  # moto accepts any key; these are not credentials of anything
    }


def _service_env(base: Path, state: dict) -> dict[str, str]:
    env = {**os.environ, **client_env(state)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    # Ray jobs run `python -m flows.cli`: the `python` on PATH must be this environment's.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env["PREFECT_HOME"] = str(base / "prefect")
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    env["DO_NOT_TRACK"] = "1"
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


def _commands(base: Path, state: dict) -> dict[str, list[str]]:
    p, r, py = state["ports"], state["ray_ports"], sys.executable
    mlflow_dir = base / "mlflow"
    return {
        "s3": [py, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(p["s3"])],
        "mlflow": [
            py,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(p["mlflow"]),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{mlflow_dir}/mlflow.db",
            "--default-artifact-root",
            str(mlflow_dir / "artifacts"),
        ],  # fmt: skip
        "prefect": [py, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(p["prefect"])],
        "ray": [
            _bin("ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address",
            "127.0.0.1",
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(p["ray"]),
            "--port",
            str(r["gcs"]),
            "--ray-client-server-port",
            str(r["client"]),
            "--dashboard-agent-listen-port",
            str(r["agent_listen"]),
            "--dashboard-agent-grpc-port",
            str(r["agent_grpc"]),
            "--metrics-export-port",
            str(r["metrics"]),
            "--runtime-env-agent-port",
            str(r["runtime_env"]),
            "--node-manager-port",
            str(r["node_manager"]),
            "--object-manager-port",
            str(r["object"]),
            "--temp-dir",
            state["ray_temp"],
            "--num-cpus",
            str(os.cpu_count() or 2),
            "--disable-usage-stats",
        ],  # fmt: skip
        "worker": [py, "-m", "prefect", "worker", "start", "--pool", POOL, "--type", "process"],
    }


def _get(url: str, headers: dict | None = None, data: bytes | None = None, timeout: float = 3.0) -> bytes:
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.read()


def health(name: str, state: dict) -> str | None:
    """None if the service answers its health endpoint, else why not (one phrase)."""
    u = state["urls"]
    try:
        if name == "prefect":
            _get(f"{u['prefect']}/api/health")
        elif name == "mlflow":
            _get(f"{u['mlflow']}/health")
        elif name == "s3":
            _get(f"{u['s3']}/moto-api/")
        elif name == "ray":
            token = Path(state["ray_token_path"]).read_text().strip()
            _get(f"{u['ray']}/api/version", {"Authorization": f"Bearer {token}"})
        elif name == "worker":
            body = json.dumps({"workers": {"status": {"any_": ["ONLINE"]}}}).encode()
            online = json.loads(_get(f"{u['prefect']}/api/work_pools/{POOL}/workers/filter", data=body))
            if not online:
                return "no worker of the pool is online"
    except Exception as e:  # noqa: BLE001 - any failure is "not healthy", said in one phrase
        return f"{type(e).__name__}: {' '.join(str(e).split())[:120]}"
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def session_pids(sid: int) -> list[int]:
    """Every live process in session `sid` (each service is started as a session leader; Ray's children stay in it)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[3]) == sid:
            found.append(int(stat.parent.name))
    return found


def stack_pids(state: dict) -> list[int]:
    """Every live process the stack started: its services' sessions, and any Ray process that left its session
    (found by the stack's own Ray temp dir on its command line)."""
    pids = {p for svc in state["services"].values() for p in session_pids(svc["pid"])}
    marker = (state.get("ray_temp") or "\0").encode()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if marker in cmdline.read_bytes():
                pids.add(int(cmdline.parent.name))
        except OSError:
            continue
    return sorted(pids - {os.getpid()})


def _start(name: str, base: Path, state: dict, env: dict) -> None:
    log = base / "logs" / f"{name}.log"
    with open(log, "ab") as f:
        cmd = _commands(base, state)[name]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    state["services"][name] = {"pid": proc.pid, "log": str(log)}
    (base / "pids").mkdir(exist_ok=True)
    (base / "pids" / f"{name}.pid").write_text(str(proc.pid))
    _save(base, state)


def _wait_healthy(names: list[str], state: dict, timeout_s: float = 120) -> None:
    deadline, waiting = time.monotonic() + timeout_s, list(names)
    while waiting:
        for name in list(waiting):
            pid = state["services"][name]["pid"]
            if health(name, state) is None:
                waiting.remove(name)
            elif not session_pids(pid):
                raise StackError(f"{name} exited at start; see {state['services'][name]['log']}")
        if waiting and time.monotonic() > deadline:
            name = waiting[0]
            raise StackError(f"{name} not healthy after {timeout_s:.0f} s ({health(name, state)}); "
                             f"see {state['services'][name]['log']}")  # fmt: skip
        time.sleep(0.5)


def _save(base: Path, state: dict) -> None:
    (base / "state.json").write_text(json.dumps(state, indent=1))


def load(base: Path) -> dict | None:
    """The stack's recorded state, or None if no stack was started from this folder."""
    path = base / "state.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _prefect(args: list[str], base: Path, state: dict, env: dict) -> None:
    log = base / "logs" / "prefect-cli.log"
    with open(log, "ab") as f:
        done = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", *args], cwd=ROOT, env=env,
                              stdout=f, stderr=subprocess.STDOUT, timeout=300)  # fmt: skip
    if done.returncode:
        raise StackError(f"`prefect {' '.join(args)}` failed (exit {done.returncode}); see {log}")


def make_bucket(state: dict, bucket: str = BUCKET) -> None:
    """Create `bucket` on the stack's moto S3 server; a bucket that exists already is left as it is."""
    import s3fs  # a core dependency, imported here so `ldm stack status` and `down` stay light

    fs = s3fs.S3FileSystem(
        key=FAKE_S3_KEYS["AWS_ACCESS_KEY_ID"],
        secret=FAKE_S3_KEYS["AWS_SECRET_ACCESS_KEY"],
        client_kwargs={"endpoint_url": state["urls"]["s3"]},
        skip_instance_cache=True,
    )
    try:
        fs.mkdir(bucket)
    except FileExistsError:
        pass
    except Exception as e:  # noqa: BLE001 - any failure is the user's one line, naming the bucket
        why = f"{type(e).__name__}: {' '.join(str(e).split())[:120]}"
        raise StackError(f"could not create bucket s3://{bucket} at {state['urls']['s3']}: {why}") from e


def up(base: Path, ports_spec: str | None = None) -> dict:
    """Start every service, create the S3 bucket and the work pool, register the deployments; returns the state."""
    state = load(base)
    if state and any(session_pids(s["pid"]) for s in state["services"].values()):
        raise StackError(f"a stack is already running from {base}; `ldm stack status` or `ldm stack down` first")
    ports = parse_ports(ports_spec)
    taken = [f"{name} port {port}" for name, port in ports.items() if _port_taken(port)]
    if taken:
        raise StackError(f"{', '.join(taken)} already in use by another process; "
                         f"pick others with --ports NAME=PORT,... or LDM_STACK_PORTS")  # fmt: skip
    for sub in ("logs", "prefect", "mlflow/artifacts", "ray"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    token_path = base / "ray" / "auth_token"
    if not token_path.is_file():
        token_path.write_text(secrets.token_hex(32))
        token_path.chmod(0o600)
    state = {
        "ports": ports,
        "urls": urls(ports),
        "ray_ports": {k: _free_port() for k in RAY_INTERNAL},
        # Ray's unix sockets live under its temp dir, whose path must stay short (108-byte socket paths)
        "ray_temp": tempfile.mkdtemp(prefix="ldm-ray-"),
        "ray_token_path": str(token_path.resolve()),
        "services": {},
    }
    base.mkdir(parents=True, exist_ok=True)
    env = _service_env(base.resolve(), state)
    try:
        for name in ("s3", "mlflow", "prefect", "ray"):
            _start(name, base.resolve(), state, env)
        _wait_healthy(["s3", "mlflow", "prefect", "ray"], state)
        make_bucket(state)  # moto starts empty: without it the README's s3://my-bucket/w run fails at once
        _prefect(["work-pool", "create", POOL, "--type", "process", "--overwrite"], base, state, env)
        # train-ldm/prod names this pool; it must exist to register. No worker serves it here.
        _prefect(["work-pool", "create", PROD_POOL, "--type", "kubernetes", "--overwrite"], base, state, env)
        _start("worker", base.resolve(), state, env)
        _prefect(["deploy", "--all"], base, state, {**env, "LDM_REPO_DIR": str(ROOT)})
        _wait_healthy(["worker"], state)
    except BaseException:
        down(base)
        raise
    return state


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)


def down(base: Path) -> list[int]:
    """Stop the process groups `up` started (INT, then TERM, then KILL); returns any pid left (none expected)."""
    state = load(base)
    if not state:
        return []
    leaders = [s["pid"] for s in state["services"].values()]
    # The worker stops on INT only; Ray's gcs_server and raylet ignore TERM: each gets the signal that works.
    for sig, wait_s in ((signal.SIGINT, 5), (signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        live = [pid for pid in leaders if session_pids(pid)]
        if not live:
            break
        _signal_all(live, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and any(session_pids(p) for p in live):
            time.sleep(0.2)
    for pid in stack_pids(state):  # a Ray process that left its session: not a group we can signal
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)
    left = stack_pids(state)
    if not left:
        shutil.rmtree(state.get("ray_temp") or "/nonexistent", ignore_errors=True)
        (base / "state.json").unlink(missing_ok=True)
        shutil.rmtree(base / "pids", ignore_errors=True)
    return left


def status(base: Path) -> dict[str, str]:
    """Each service's health: "ok", or why not."""
    state = load(base)
    if not state:
        return {}
    return {
        name: (health(name, state) or "ok") if session_pids(svc["pid"]) else "not running"
        for name, svc in state["services"].items()
    }


def _print_urls(state: dict, base: Path) -> None:
    u = state["urls"]
    print(f"Prefect UI and API  {u['prefect']}   (work pool {POOL}, deployments train-ldm/local, train-ldm/prod)")
    print(f"MLflow UI           {u['mlflow']}")
    print(f"Ray dashboard       {u['ray']}   (token in {state['ray_token_path']})")
    print(f"S3 (moto)           {u['s3']}   (bucket s3://{BUCKET})")
    print(f"logs                {base / 'logs'}")
    print("point a shell at it: " + " ".join(f"{k}={v}" for k, v in client_env(state).items() if "AWS_SECRET" not in k))


def main(action: str, folder: str, ports_spec: str | None = None) -> int:
    """`ldm stack ACTION`: 0 on success; a problem the user can fix is one line on stderr and exit 1."""
    base = Path(folder)
    try:
        if action == "up":
            state = up(base, ports_spec)
            _print_urls(state, base)
        elif action == "down":
            left = down(base)
            if left:
                print(f"ldm: stack: processes still running after KILL: {left}", file=sys.stderr)
                return 1
            print("stack stopped")
        else:
            health_now = status(base)
            if not health_now:
                print(f"no stack started from {base}")
                return 1
            for name, h in health_now.items():
                print(f"{name:<8} {h}")
            if any(h != "ok" for h in health_now.values()):
                return 1
            _print_urls(load(base) or {}, base)
    except StackError as e:
        print(f"ldm: stack: {e}", file=sys.stderr)
        return 1
    return 0
