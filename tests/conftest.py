"""Shared fixtures: the test profile, one real ingest run, and a moto S3 server on 127.0.0.1; and the end of the
session: nothing the tests started left running, and an exit Ray's native threads cannot crash."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.helpers import free_port, make_config


@pytest.fixture(scope="session")
def ingested(tmp_path_factory):
    """One uninterrupted ingest of the test profile's synthetic source: (config, manifest)."""
    from flows.registry import run as run_stage

    cfg = make_config(tmp_path_factory.mktemp("ingested"))
    return cfg, run_stage("ingest", cfg)


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1; yields its endpoint URL. Env vars point boto (and s3fs) at it."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=1).read()
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto server did not start") from None
            time.sleep(0.2)
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield endpoint
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh, empty bucket on the moto server; yields its s3:// URL."""
    import s3fs

    name = "t-" + request.node.name.lower().replace("_", "-")[:40]
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server}, skip_instance_cache=True)
    fs.mkdir(name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def components(tmp_path_factory, ingested):
    """train-clip, train-aesthetic and filter run on a copy of the ingested test data: (config, manifests)."""
    import shutil
    from pathlib import Path

    from flows.registry import run as run_stage

    src, _ = ingested
    workdir = tmp_path_factory.mktemp("components")
    shutil.copytree(Path(src.workdir) / "raw", workdir / "raw")
    cfg = make_config(workdir)
    manifests = {
        "clip": run_stage("train-clip", cfg),
        "aesthetic": run_stage("train-aesthetic", cfg),
        "filter": run_stage("filter", cfg),
    }
    return cfg, manifests


@pytest.fixture(scope="session")
def latents(components):
    """train-vae and precompute on the components' work directory: (config, precompute manifest)."""
    from flows.registry import run as run_stage

    cfg, _ = components
    run_stage("train-vae", cfg)
    return cfg, run_stage("precompute", cfg)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from a second thread, and two OpenMP threads on a busy 2-core box stall."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# The end of the session. The suite runs the Ray driver in this process (the precompute and train stages run
# in-process; test_train's and test_evaluate's `cluster` fixtures connect to a Cluster). Two kinds of thing can
# then still run when pytest returns. Whatever a test or fixture failed to stop: pytest_sessionfinish below stops
# it and names it. And threads that Ray's core library (ray/_raylet.so, with its own gRPC) starts on the first
# ray.init() and that ray.shutdown() never stops: gRPC's global timer, executor and event-engine threads, the
# GCS client's I/O thread, a Boost.Asio pool and OpenCensus's metrics harvester (a detached singleton, left
# running on purpose so that ray.init() can follow ray.shutdown(): ray-project/ray#13565, whose review foresaw
# a segfault at exit from it). They run on while the interpreter finalizes and while exit() runs the C++ static
# destructors of _raylet.so and of the libraries beside it; one that wakes then and touches torn-down state
# crashes the process after pytest's summary, with no faulthandler dump (it is off by then), seldom and by
# timing: `362 passed` and then `Segmentation fault` from `make test`. Ray's threads and objects outliving
# ray.shutdown() in a test process are a known source of segfaults (ray-project/ray#31145). No cleanup here can
# stop them; only keeping the Ray driver out of this process would. So when they are there at exit, the process
# ends with os._exit and pytest's exit status, after the exit hooks registered later than this one have run
# (Ray's, multiprocessing's, those of everything the tests import), skipping only the finalization and the
# native destructors.

# Ray's native threads as /proc names them (15 characters at most), seen with Ray 2.60 after ray.shutdown().
RAY_NATIVE_THREADS = frozenset(
    {"gcs_client_io_s", "worker.io", "grpc_global_tim", "default-executo", "resolver-execut", "event_engine"}
)
# Children that the standard library starts for itself and that end with this process by design.
STDLIB_HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")
_session: pytest.Session | None = None


def pytest_sessionstart(session):
    global _session
    _session = session


@pytest.hookimpl(trylast=True)  # after pytest's own, which tears down the session fixtures (s3_server's moto)
def pytest_sessionfinish(session):
    # Here, not at exit: before pytest's summary line (so CI's last line stays pytest's) and while Python is
    # whole, which Ray's own exit hook does not have (it runs ray.shutdown() during interpreter exit).
    left = _stop_ray() + _stop_children()
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if left and reporter is not None:
        reporter.write_line("")  # ends the progress line
        reporter.write_sep("-", "left running at the end of the session (stopped now)")
        for line in left:
            reporter.write_line(line)


def _stop_ray() -> list[str]:
    """Disconnect a Ray driver a test or fixture left connected, stopping a local cluster it started."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return []
    ray.shutdown(wait_for_processes=True)
    return ["the Ray driver: ray.init() with no ray.shutdown() (a failed test, or a run without the one that ends it)"]


def _stop_children(grace_s: float = 5.0) -> list[str]:
    """SIGTERM, then SIGKILL, each live child process of this one (with its process group, if it leads one)."""
    pids = {pid: cmd for pid, cmd in _children().items() if not any(h in cmd for h in STDLIB_HELPERS)}
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in pids:
        if _alive(pid):
            _signal(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):  # reaped by its Popen object meanwhile
            os.waitpid(pid, 0)
    return [f"child process {pid}: {cmd}" for pid, cmd in pids.items()]


def _children() -> dict[int, str]:
    """This process's live (not zombie) children and their command lines; none found without /proc."""
    found = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                state, ppid = f.read().rsplit(")", 1)[1].split()[:2]
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # it exited meanwhile
            continue
        if int(ppid) == os.getpid() and state != "Z":
            found[int(entry)] = cmd[:200]
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _signal(pid: int, sig: int) -> None:
    """A child started in its own session (start_new_session=True) takes its descendants with it."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _ray_threads() -> set[str]:
    """The names of this process's threads that Ray's native library started; none found without /proc."""
    names = set()
    for tid in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else []:
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                names.add(f.read().strip())
        except OSError:  # it ended meanwhile
            continue
    return names & RAY_NATIVE_THREADS


def _exit_past_ray_threads() -> None:
    """End the process here, skipping finalization and C++ static destructors, when Ray's threads still run."""
    if _session is None or "ray._raylet" not in sys.modules or not _ray_threads():
        return
    logging.shutdown()  # registered before this hook, so os._exit would skip it
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(_session.exitstatus))


# At import, once per process (pytest imports this module once, before the tests import ray): exit hooks run
# last-registered first, so this one runs after those of everything imported later.
atexit.register(_exit_past_ray_threads)
