"""The evaluate stage on a prod-shaped Ray cluster: its actors run on the worker nodes only, and every metric
equals what the sweep computed before it moved to Ray (one process sampling each point's batches in turn).

The cluster is shaped like the RayCluster in infra/k8s: a head with 0 CPUs (so nothing may be placed there)
and two 1-CPU worker nodes, each with its own custom resource to name it by.
"""

from __future__ import annotations

import tempfile

import numpy as np
import pytest
import torch

from tests.helpers import make_config
from tests.ldm.test_train import TRAIN, write_inputs

RUN = [*TRAIN, "train.steps=2", "compute.num_workers=1", "train.batch_size=4", "train.audit=false"]
# 12 prompts in batches of 5: every point is three batches (5, 5, 2), so each point's batches are spread over
# both actors; both samplers (the multistep one keeps state between steps), both checkpoints, guidance on/off.
SWEEP = ["evaluate.batch_size=5", "evaluate.samplers=[ddim,dpm++]", "evaluate.checkpoints=[ema,raw]",
         "evaluate.guidance=[1,3]", "evaluate.registered_model=ldm-ray-test"]  # fmt: skip


@pytest.fixture(scope="module")
def prod_shaped():
    """A head with 0 CPUs and two 1-CPU worker nodes labelled node_a and node_b; node ids by label."""
    import ray
    from ray.cluster_utils import Cluster

    tmp = tempfile.mkdtemp(prefix="re", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False, "temp_dir": tmp})
    try:  # a failing add_node or init must not leave the head's processes running
        for label in ("node_a", "node_b"):
            c.add_node(num_cpus=1, resources={label: 1})
        ray.shutdown()  # an earlier test's in-process Ray would make init() ignore the address
        ray.init(address=c.address, log_to_driver=False)
        nodes = {}
        for n in ray.nodes():
            label = next((k for k in n["Resources"] if k.startswith("node_")), "head")
            nodes[label] = n["NodeID"]
        yield nodes
    finally:
        ray.shutdown()
        c.shutdown()


def _old_run_point(parts, prompts, targets, ref, point, seed, batch, precision):
    """The sweep's run_point as it was before the stage moved to Ray (ldm/evaluate/sweep.py at 29e740c), kept
    here verbatim as the oracle: one scheduler per point, the batches in turn, the sums in one process."""
    from ldm.devices import autocast_dtype
    from ldm.diffusion.guidance import make_sampler, sample
    from ldm.evaluate.sweep import GRID_IMAGES, prompt_states, to_uint8
    from ldm.metrics import judge as J
    from ldm.metrics.frechet import FeatureStats, clip_score, frechet_distance
    from ldm.train.export import decode

    states, mask, e_states, e_mask = prompt_states(parts, prompts)
    unet = parts.unets[point["checkpoint"]]
    scheduler = make_sampler(point["sampler"], parts.scheduler_config)
    stats, cos_sum = FeatureStats(parts.extractor.dim), 0.0
    preds: dict[str, list[np.ndarray]] = {k: [] for k in J.HEADS}
    first = None
    device_type = unet.device.type
    amp = autocast_dtype(precision, device_type) is not None
    for b, i in enumerate(range(0, len(prompts), batch)):
        g = torch.Generator().manual_seed(seed * 1_000_003 + b)
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=amp):
            latents = sample(unet, scheduler, states[i : i + batch], mask[i : i + batch], e_states, e_mask,
                             point["steps"], point["guidance"], g, parts.index["latent_shape"])  # fmt: skip
        images = to_uint8(decode(parts.vae, latents, parts.index["scale_factor"]))
        first = images[:GRID_IMAGES] if first is None else first
        emb = parts.scorer.encode_images(images)
        stats.update(emb if parts.extractor.name == "clip" else parts.extractor(images))
        cos_sum += clip_score(emb, parts.states["text_emb"][i : i + batch]) * len(images)
        if parts.judge is not None:
            for k, v in J.predict(parts.judge, images).items():
                preds[k].append(v)
    metrics = {"fd": frechet_distance(*stats.mean_cov(), *ref), "clip_score": cos_sum / len(prompts)}
    if parts.judge is not None and targets is not None:
        acc = J.accuracy({k: np.concatenate(v) for k, v in preds.items()}, targets)
        metrics.update({f"judge_{k}": v for k, v in acc.items()})
    return metrics, first


def _oracle(cfg, m_train: dict, precision: str) -> tuple[dict, dict]:
    """Every grid point's metrics and the ceilings, computed in this process the pre-Ray way."""
    from ldm.clip.encoder import load_encoder
    from ldm.evaluate.data import prompt_set, real_batches, reference, reference_stats
    from ldm.evaluate.stage import grid_points
    from ldm.evaluate.sweep import ceilings, checkpoint_dir, judge_for, judge_targets, load_parts, pipeline_dir
    from ldm.metrics.features import make_extractor

    prompts = prompt_set(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        scorer = load_encoder(cfg)
        extractor = make_extractor(cfg, scorer)
        root = pipeline_dir(m_train["pipeline"], tmp)
        parts = load_parts(cfg, root, checkpoint_dir(m_train, tmp), scorer, extractor)
        ref = reference_stats(cfg, reference(cfg, prompts), extractor)
        parts.judge = judge_for(cfg)
        targets = judge_targets(prompts.specs)
        ceil = ceilings(parts, real_batches(cfg, prompts.specs, cfg.evaluate.batch_size), targets)
        points = {}
        for p in grid_points(cfg.evaluate):
            metrics, _ = _old_run_point(parts, prompts.prompts, targets, ref, p, cfg.seed, cfg.evaluate.batch_size,
                                        precision)  # fmt: skip
            points[(p["checkpoint"], p["sampler"], p["steps"], p["guidance"])] = metrics
    return points, ceil


def test_sweep_runs_on_the_worker_nodes_and_matches_the_in_process_sweep(prod_shaped, tmp_path):
    """Two actors, one per worker node (none on the 0-CPU head), each sampling batches of several points;
    FD, CLIP score and the judge's accuracies of all 9 points, and the ceilings, equal the pre-Ray sweep's.

    Bugs caught: actors asking for no resources (they would land anywhere, the head included) or all on one
    node; a batch whose noise depends on the actor or on the batches it sampled before (a shared generator,
    a multistep sampler not reset); batches folded out of order (judge predictions matched to the wrong
    prompts, float sums in another order); a point logged before its last batch or without the reference
    statistics; the untrained baseline initialised differently in the actors; models left on the wrong device.
    """
    from flows.registry import run

    nodes = prod_shaped
    write_inputs(tmp_path)
    cfg = make_config(tmp_path, *RUN, *SWEEP)
    m_train = run("train", cfg)
    m = run("evaluate", cfg)

    actors = m["cluster"]["actors"]
    assert {a["node"] for a in actors} == {nodes["node_a"], nodes["node_b"]}, (actors, nodes)
    assert all(a["units"] > 0 and a["device"] == "cpu" for a in actors)
    assert sum(a["units"] for a in actors) == 9 * 3 + 2  # every batch, the reference and the ceilings, once
    assert m["points"] == {"logged": 9, "skipped": 0}

    points, ceil = _oracle(cfg, m_train, cfg.evaluate.mixed_precision)
    # Float tolerance, not bit equality: the actors run one torch thread, this process two, and the CPU's bf16
    # matrix kernels sum in another order then (seen: FD 4.71055580e-4 against 4.71053196e-4). FD is a
    # difference of traces of order 1 (L2-normalised CLIP features in float32), hence an absolute bound for it.
    for row in m["grid"]:
        want = points[(row["checkpoint"], row["sampler"], row["steps"], row["guidance"])]
        for k, v in want.items():
            assert row[k] == pytest.approx(v, rel=1e-6, abs=1e-7 if k == "fd" else 1e-9), (row, k, v)
    assert m["ceilings"] == pytest.approx(ceil)
