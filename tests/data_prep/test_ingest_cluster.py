"""Ingest on a prod-shaped local Ray cluster: a head with 0 CPUs and two worker nodes, each with its own custom
resource, on this machine. One worker node's raylet is SIGKILLed while it downloads a shard."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
import time
from urllib.parse import urlsplit

import pytest

from flows.registry import run as run_stage
from tests.helpers import make_config, raw_samples


@pytest.fixture
def prod_shaped():
    """(the Cluster, {name: worker Node}): head with num_cpus=0, workers node_a and node_b with 1 CPU each."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()  # a local instance another test started would be reused instead of this cluster
    tmp = tempfile.mkdtemp(prefix="ri", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False, "temp_dir": tmp})
    try:  # a failing add_node or init must not leave the head's processes running
        nodes = {name: c.add_node(num_cpus=1, resources={name: 1}) for name in ("node_a", "node_b")}
        ray.init(address=c.address, log_to_driver=False)
        yield c, nodes
    finally:
        ray.shutdown()
        c.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def _kill_when_in_flight(shards, victim, seen: dict, timeout_s: float = 180) -> None:
    """SIGKILL the victim node's raylet once a shard is finished and the victim has an attempt in flight."""
    prefix = victim.node_id[:12]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        finished = {p.name.removesuffix("_stats.json") for p in shards.glob("*_stats.json")}
        attempts = [p.name for p in (shards / "_attempts").glob(f"*-{prefix}-*")]
        in_flight = [a for a in attempts if a.split("-")[0] not in finished]
        if finished and in_flight:
            seen.update(finished=len(finished), in_flight=in_flight)
            os.kill(victim.all_processes["raylet"][0].process.pid, signal.SIGKILL)
            return
        time.sleep(0.05)


def test_a_worker_node_killed_mid_ingest_loses_nothing_and_repeats_nothing(prod_shaped, ingested, tmp_path):
    """Bugs caught: a shard whose task died with its node left unfinished (no retry) or counted twice; a shard
    retried into the same files an orphaned attempt still writes; shards placed on the 0-CPU head, or all on
    one node (the tasks must spread over the worker nodes); the ingest driven from anything but the cluster's
    own tasks (the prefilter, cleaning and download run there)."""
    _, nodes = prod_shaped
    ref_cfg, ref = ingested
    cfg = make_config(tmp_path, "source.delay_ms=150", "ingest.threads=2", "ingest.samples_per_shard=20",
                      "ingest.processes=2")  # fmt: skip
    shards = tmp_path / "raw" / "shards"
    seen: dict = {}
    killer = threading.Thread(target=_kill_when_in_flight, args=(shards, nodes["node_b"], seen), daemon=True)
    killer.start()
    manifest = run_stage("ingest", cfg)
    killer.join()

    assert seen, "the worker node was never killed with a shard in flight"
    assert seen["finished"] < len(manifest["shards"])  # killed mid-ingest, not after
    assert set(manifest["shards_by_node"]) <= {n.node_id for n in nodes.values()}  # none on the head
    assert manifest["shards_by_node"].get(nodes["node_a"].node_id, 0) >= 1  # node_b had one in flight: both used
    killed_shard = seen["in_flight"][0].split("-")[0]
    assert f"{killed_shard}.tar" in {s["name"] for s in manifest["shards"]}  # redone elsewhere

    assert manifest["counts"] == ref["counts"]  # nothing lost, nothing twice
    samples = raw_samples(str(tmp_path))
    assert len({s["key"] for s in samples}) == len(samples) == manifest["counts"]["success"]
    got = sorted((urlsplit(s["json"]["url"]).path, s["txt"]) for s in samples)
    uninterrupted = sorted((urlsplit(s["json"]["url"]).path, s["txt"]) for s in raw_samples(ref_cfg.workdir))
    assert got == uninterrupted
    assert not (shards / "_attempts").exists() and not (shards / "_tmp").exists()
