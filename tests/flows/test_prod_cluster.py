"""The Ray stages on a local cluster shaped like prod: a head with 0 CPUs, two worker nodes with their own labels.

Each stage is sent as a Ray job exactly as a flow run with a cluster address sends it (flows.jobs); Ray's
state API then says on which node every task and actor of that job ran. Outputs are compared with the
in-process run of the same stages (the `latents` fixture).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from flows import jobs
from flows.endpoints import ray_headers
from ldm.io import storage
from ldm.io.shards import iter_samples
from tests.helpers import free_port, make_config

pytestmark = pytest.mark.slow
# As prod: a job's driver asks for a CPU, which keeps it off the 0-CPU head.
JOB = ("compute.job_cpus=1", "ingest.processes=2")  # two shards in flight: both worker nodes download


def add_node(cluster, **kw):
    """A worker node with a dashboard agent port of its own and the head's temp dir (where the fixture wrote
    the cluster's address for job supervisors to find): the default /tmp/ray names whatever local Ray this
    machine started last (the in-process stages of the fixtures start one). A KubeRay pod has its own /tmp."""
    temp_dir = cluster.head_node.get_temp_dir_path()
    return cluster.add_node(dashboard_agent_listen_port=free_port(), temp_dir=temp_dir, **kw)


@pytest.fixture(scope="module")
def prod_cluster():
    """(dashboard URL, {label: worker node id}, head node id, the Cluster): the head has 0 CPUs, each worker 2."""
    from ray.cluster_utils import Cluster
    from ray.job_submission import JobSubmissionClient

    tmp = tempfile.mkdtemp(prefix="rp", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    monkeypatch = pytest.MonkeyPatch()
    # A job runs `python -m flows.cli`: the cluster's processes must find this environment's python first.
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[2]))
    port = free_port()
    # Every node's dashboard agent on a port of its own: on the default (52365) a second cluster on this
    # machine leaves the head without an agent, and the job API answers "No available agent" forever.
    head = {"num_cpus": 0, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": port,
            "dashboard_agent_listen_port": free_port(), "temp_dir": tmp}  # fmt: skip
    c = Cluster(initialize_head=True, head_node_args=head)
    try:  # a failing add_node must not leave the head's processes running
        # A job's supervisor finds its cluster in <temp dir>/ray_current_cluster, which `ray start` (and so
        # KubeRay) writes there; Cluster writes only /tmp/ray's, which the fixtures' in-process Ray overwrites.
        from ray._private.utils import write_ray_address

        write_ray_address(c.head_node.gcs_address, tmp)
        workers = {label: add_node(c, num_cpus=2, resources={label: 1}).node_id for label in ("node_a", "node_b")}
        c.wait_for_nodes()
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:  # the dashboard's job API answers some seconds after the head is up
            try:
                JobSubmissionClient(url, headers=ray_headers()).list_jobs()
                break
            except Exception:
                assert time.monotonic() < deadline, f"the dashboard at {url} never answered"
                time.sleep(1)
        yield url, workers, c.head_node.node_id, c
    finally:
        c.shutdown()
        monkeypatch.undo()
        shutil.rmtree(tmp, ignore_errors=True)


def _placement(url: str, sid: str, marker: str) -> tuple[set[str], str]:
    """(nodes that ran the stage's work, the node of the job's driver). The work: the job's actors whose class
    name holds `marker` and its tasks that asked for CPUs or GPUs (Ray Data's 0-CPU bookkeeping actors may sit
    on the head). The job is found through its actors or tasks named by `marker`: the job API's record of a
    finished job does not always carry its Ray job id, and each stage runs once on this cluster."""
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_actors, list_tasks

    driver = JobSubmissionClient(url, headers=ray_headers()).get_job_info(sid).driver_node_id
    actors = [a for a in list_actors(address=url, limit=10_000, detail=True) if marker in a.class_name]
    named = [t for t in list_tasks(address=url, limit=10_000) if marker in t.name]
    job_ids = {a.job_id for a in actors} | {t.job_id for t in named}
    assert driver and len(job_ids) == 1, (sid, driver, marker, job_ids)
    flt = [("job_id", "=", job_ids.pop())]
    tasks = [t for t in list_tasks(address=url, filters=flt, limit=10_000, detail=True)
             if t.node_id and any(t.required_resources.get(k, 0) > 0 for k in ("CPU", "GPU"))]  # fmt: skip
    print(marker, [(a.node_id, a.state) for a in actors], sorted({t.name for t in tasks}))  # shown on failure
    # An actor the pool asked for but never placed (the shards ran out first) has no node.
    return {a.node_id for a in actors if a.node_id} | {t.node_id for t in tasks}, driver


def _raw(workdir: Path) -> dict[str, list[str]]:
    tars = sorted((workdir / "raw" / "shards").glob("*.tar"))
    return {t.name: sorted(s["key"] for s in iter_samples(str(t))) for t in tars}


def _kept(workdir: Path) -> dict[str, list[str]]:
    tars = sorted((workdir / "filtered" / "shards").glob("*.tar"))
    return {t.name: [s["key"] for s in iter_samples(str(t))] for t in tars}


def _latents(workdir: Path) -> dict[str, dict[str, np.ndarray]]:
    out = {}
    for p in sorted((workdir / "latents" / "parts").glob("*.parquet")):
        t = pq.read_table(p)
        rows = zip(t.column("key").to_pylist(), t.column("latent").to_pylist(), strict=True)
        out[p.name] = {k: np.frombuffer(b, np.float16) for k, b in rows}
    return out


@pytest.mark.timeout(1800)  # with its fixtures (ingest, train-clip, filter, train-vae, precompute in-process)
def test_data_stages_run_on_both_worker_nodes_never_the_head_and_match_the_in_process_run(
    prod_cluster, latents, tmp_path
):
    """Bugs caught: a stage's work done in its job's driver, or a driver submitted without resources landing on
    the head (its node in the placement); an actor pool sized to the cluster's total CPUs that waits forever
    for CPUs the driver holds (the job never ends); a job that overrides RAY_ADDRESS and loses its actors;
    outputs that differ from the in-process run's (keys, counts, latents); downloads that all ran on one node.
    Evaluate's actors on this cluster shape: tests/ldm/test_evaluate_ray.py."""
    url, workers, head, _ = prod_cluster
    cfg, precomputed = latents
    src, w = Path(cfg.workdir), tmp_path / "w"
    shutil.copytree(src / "models", w / "models")  # the tiny CLIP, aesthetic MLP and VAE the fixture trained
    jcfg = make_config(w, *JOB)
    placed = {}
    # Each stage's work: its download tasks, or its actors' class.
    for stage, marker in (("ingest", "_download"), ("filter", "ShardFilter"), ("precompute", "ShardEncoder")):
        command = jobs.entrypoint(stage, "test", list(JOB), str(w), [])
        sid = jobs.run_job(url, stage, jcfg, command, "prod-shaped", print)  # the job's log, shown on failure
        placed[stage] = _placement(url, sid, marker)
    for stage, (nodes, driver) in placed.items():
        assert nodes and nodes <= set(workers.values()), (stage, nodes, workers, head)  # never the head
        assert driver in workers.values(), (stage, driver, head)
    # Ingest's tasks are spread over both nodes. An actor pool's placement is Ray Data's: with 3 shards it
    # may finish on the first two actors before placing the third (seen on a loaded machine), so only the
    # stages together are required to have used both nodes.
    assert placed["ingest"][0] == set(workers.values()), (placed, workers)
    assert placed["filter"][0] | placed["precompute"][0] == set(workers.values()), (placed, workers)

    raw, raw_reference = (storage.read_json(str(d / "raw" / "manifest.json")) for d in (w, src))
    assert raw["counts"] == raw_reference["counts"]
    assert _raw(w) == _raw(src)
    filtered = storage.read_json(str(w / "filtered" / "manifest.json"))
    reference = storage.read_json(str(src / "filtered" / "manifest.json"))
    assert filtered["counts"] == reference["counts"] and filtered["shards"] == reference["shards"]
    assert _kept(w) == _kept(src)
    got, want = _latents(w), _latents(src)
    assert got.keys() == want.keys() and all(got[p].keys() == want[p].keys() for p in want)
    for part, rows in want.items():
        for key, z in rows.items():
            np.testing.assert_allclose(got[part][key], z, atol=2e-3, err_msg=f"{part} {key}")
    assert storage.read_json(str(w / "latents" / "manifest.json"))["rows"] == precomputed["rows"]


@pytest.mark.timeout(1800)
def test_a_worker_node_killed_mid_filter_loses_nothing_and_writes_nothing_twice(prod_cluster, components, tmp_path):
    """SIGKILL of every process of the worker node scoring a shard, between that shard's tar and scores writes.

    Bugs caught: a shard whose actor died counted as done (its tar written, no stats: lost from the report and the
    kept keys), or written twice (kept keys duplicated in the output); a job that fails with its node instead of
    Ray re-running the shard elsewhere. The job's driver is pinned to a node of its own (compute.job_resources),
    as prod pins drivers to a CPU group; a replacement worker joins after the kill, as KubeRay replaces a pod.
    """
    import threading

    url, workers, _, cluster = prod_cluster
    driver_node = add_node(cluster, num_cpus=1, resources={"drivers": 1})
    cfg, m = components
    src, w = Path(cfg.workdir), tmp_path / "w"
    shutil.copytree(src / "raw", w / "raw")
    shutil.copytree(src / "models", w / "models")
    first = sorted(p.stem for p in (w / "raw" / "shards").glob("*.tar"))[0]
    marker = tmp_path / "paused"
    overrides = [*JOB, "compute.job_resources={drivers: 1}", "compute.forward_env=[LDM_FILTER_PAUSE]"]
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("LDM_FILTER_PAUSE", f"{first}:tar:{marker}")  # sent to the job in its runtime_env
    outcome: dict = {}

    def run() -> None:
        try:
            command = jobs.entrypoint("filter", "test", overrides, str(w), [])
            outcome["sid"] = jobs.run_job(url, "filter", make_config(w, *overrides), command, "kill", print)
        except Exception as e:  # the assertion below shows it
            outcome["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    try:
        thread.start()
        deadline = time.monotonic() + 600
        while not marker.exists():
            assert thread.is_alive() and time.monotonic() < deadline, f"never paused: {outcome}"
            time.sleep(0.2)
        paused_on = marker.read_text()
        assert paused_on in workers.values(), (paused_on, workers)  # never the drivers' node: it has no free CPU
        victim = next(n for n in cluster.worker_nodes if n.node_id == paused_on)
        assert not (w / "filtered" / "shards" / f"{first}_stats.json").exists()
        cluster.remove_node(victim, allow_graceful=False)  # SIGKILL: raylet, object store, workers
        label = next(k for k, v in workers.items() if v == paused_on)
        # the pod KubeRay brings back
        workers[label] = add_node(cluster, num_cpus=2, resources={label: 1}).node_id
        thread.join(timeout=900)
    finally:
        monkeypatch.undo()
    assert "error" not in outcome and "sid" in outcome, outcome
    filtered = storage.read_json(str(w / "filtered" / "manifest.json"))
    assert filtered["counts"] == m["filter"]["counts"] and filtered["shards"] == m["filter"]["shards"]
    assert _kept(w) == _kept(src)  # every kept key once, in every shard
    cluster.remove_node(driver_node)
