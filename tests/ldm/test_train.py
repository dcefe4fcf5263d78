"""The train stage on a real two-node Ray cluster on this machine: DDP, fault restart, exact resume, refusals, export.

The latent rows are written directly in precompute's format (tiny VAE and CLIP saved in their real
layouts next to them), so no earlier stage runs here.
"""

from __future__ import annotations

import base64
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from ldm.config import ConfigError
from ldm.io import manifest, storage
from ldm.io.latents import part_bytes
from ldm.io.manifest import StageError
from ldm.stage import Workdir
from tests.helpers import make_config

SHAPE, TEXT_DIM, ROWS = (4, 8, 8), 128, 48
TRAIN = [
    "train.steps=6", "train.batch_size=8", "train.checkpoint_every=2", "train.log_every=2",
    "train.warmup_steps=2", "train.ema_warmup=2", "train.sample_steps=2", "train.shuffle_buffer=16",
    "train.audit=true", "train.mixed_precision=fp32", "train.keep_checkpoints=2",
]  # fmt: skip


def write_inputs(workdir: Path) -> None:
    """W/models/{vae,clip} (tiny, real layouts) and W/latents (parts + manifest) as precompute leaves them."""
    from ldm.autoencoder.model import build_vae
    from ldm.clip.model import build_model, save_model, tiny_model_config

    cfg = make_config(workdir, *TRAIN)
    wd = Workdir.of(cfg)
    vae_url, clip_url = wd.output("train-vae"), wd.output("train-clip")
    build_vae(cfg.vae, cfg.ingest.resolution, seed=0).save_pretrained(vae_url.removeprefix("file://"))
    manifest.commit(vae_url, "train-vae", "vae0", {})
    model_cfg = tiny_model_config(cfg.clip, cfg.ingest.resolution)
    save_model(build_model(model_cfg), model_cfg, clip_url)
    manifest.commit(clip_url, "train-clip", "clip0", {})
    rng = np.random.default_rng(0)
    rows = []
    for i in range(ROWS):
        n = int(rng.integers(3, 10))
        rows.append({
            "key": f"{i:06d}", "latent": rng.standard_normal(SHAPE).astype(np.float16).tobytes(),
            "scale_factor": 1.0, "latent_is_sample": False,
            "text_emb": rng.standard_normal((n, TEXT_DIM)).astype(np.float16).tobytes(), "text_len": n,
            "caption": f"caption {i}", "aesthetic": 6.0, "similarity": 0.3,
        })  # fmt: skip
    latents = wd.output("precompute")
    parts = []
    for p in range(3):  # three parts, as precompute writes one per input shard
        chunk = rows[p::3]
        storage.write_bytes_atomic(
            storage.join(latents, "parts", f"{p:05d}.parquet"), part_bytes(chunk, SHAPE, TEXT_DIM)
        )
        parts.append({"name": f"{p:05d}.parquet", "rows": len(chunk)})
    empty = rng.standard_normal((2, TEXT_DIM)).astype(np.float16)
    empty_b64 = base64.b64encode(empty.tobytes()).decode()
    manifest.commit(
        latents, "precompute", "lat0", {}, inputs={},
        vae={"path": vae_url, "weights": "vae0"},
        text_encoder={"arch": "tiny", "path": clip_url, "weights": "clip0"},
        latent_shape=list(SHAPE), text_dim=TEXT_DIM, context_length=32, scale_factor=1.0, rows=ROWS, parts=parts,
        empty_prompt={"shape": [2, TEXT_DIM], "dtype": "float16", "data_b64": empty_b64},
    )  # fmt: skip


@pytest.fixture(scope="module")
def cluster():
    """A Ray cluster of two 1-CPU nodes on this machine, shared by the tests of this module."""
    import ray
    from ray.cluster_utils import Cluster

    tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    # The Train controller polls its workers every 2 s; every fit waits on that several times. The
    # Ray processes inherit this from the test process. (The fault test's kill waits 3 s, still longer.)
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False, "temp_dir": tmp})
    try:  # a failing add_node or init must not leave the head's processes running
        c.add_node(num_cpus=1)
        ray.shutdown()  # a local Ray an earlier in-process stage (ingest, filter) left in this process
        ray.init(address=c.address, log_to_driver=False)
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
        monkeypatch.undo()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A work directory holding the tiny VAE, CLIP and latent rows."""
    workdir = tmp_path_factory.mktemp("train")
    write_inputs(workdir)
    return workdir


def _audit(run_dir: Path) -> dict[int, list[dict]]:
    return {
        int(f.stem.removeprefix("rank")): [json.loads(line) for line in f.read_text().splitlines()]
        for f in sorted((run_dir / "audit").glob("rank*.jsonl"))
    }


def _last_by_step(records: list[dict]) -> dict[int, dict]:
    """The last record of each step: a restart redoes steps after its checkpoint."""
    return {r["step"]: r for r in records if "step" in r}


def test_two_nodes_ddp_restart_after_kill_and_export(cluster, inputs, tmp_path):
    """Two gloo workers on two Ray nodes; the last rank SIGKILLs itself once after step 3.

    Bugs caught: ranks drifting apart (no DDP wrap, or EMA/optimizer stepped on one rank only); both
    ranks reading the same rows (dataset not split); a restart that starts over or runs past the
    configured steps instead of resuming from the last checkpoint; a restart forking a second MLflow
    run; an export diffusers cannot load.
    """
    import mlflow
    from diffusers import UNet2DConditionModel

    from flows.cli import main
    from flows.registry import run

    cfg = make_config(inputs, *TRAIN, "train.run_id=ddp", "train.fail_at_step=3", "compute.num_workers=2")
    m = run("train", cfg)
    run_dir = inputs / "runs" / "ddp"
    assert m["steps"] == 6 and m["skipped_steps"] == 0
    assert (run_dir / "fault_injected").exists()
    audit = _audit(run_dir)
    finals = {rank: [r for r in recs if "final_step" in r][-1] for rank, recs in audit.items()}
    assert sorted(finals) == [0, 1]
    assert all(f["final_step"] == 6 for f in finals.values())
    assert finals[0]["params"] == finals[1]["params"]  # every rank ends with bit-identical weights
    assert finals[0]["node"] != finals[1]["node"]  # one worker per Ray node
    steps = {rank: _last_by_step(recs) for rank, recs in audit.items()}
    assert sorted(steps[0]) == sorted(steps[1]) == [1, 2, 3, 4, 5, 6]
    seen = {rank: {k for r in s.values() if r["epoch"] == 0 for k in r["keys"]} for rank, s in steps.items()}
    assert seen[0] and seen[1] and not seen[0] & seen[1]  # the ranks' rows in an epoch are disjoint
    # The killed rank redid the steps after the last checkpoint (2), and only those.
    redone = [r["step"] for r in audit[1] if "step" in r]
    assert redone.count(3) == 2 and redone.count(2) == 1
    mlflow.set_tracking_uri(f"sqlite:///{inputs}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=[cfg.tracking.experiment], output_format="list")
    mine = [r for r in runs if r.info.run_name == "train/ddp"]
    assert len(mine) == 1
    losses = mlflow.MlflowClient().get_metric_history(mine[0].info.run_id, "loss")
    assert sorted({h.step for h in losses}) == [2, 4, 6]
    grids = [a.path for a in mlflow.MlflowClient().list_artifacts(mine[0].info.run_id, "samples")]
    assert "samples/step0000006.png" in grids  # a sample grid at each checkpoint, the last included
    pipeline = run_dir / "pipeline"
    unet = UNet2DConditionModel.from_pretrained(pipeline / "unet")
    assert unet.config.cross_attention_dim == TEXT_DIM and unet.config.sample_size == SHAPE[1]
    out = tmp_path / "samples" / "x.png"  # a folder not made yet (it used to fail after the sampling)
    assert main(["generate", "--model", str(pipeline), "a red circle", "--steps", "2", "--out", str(out)]) == 0
    assert out.stat().st_size > 0


def test_exact_resume_matches_an_uninterrupted_run(cluster, inputs):
    """4 steps straight vs 2 steps, stop, `--resume`, 2 more (one worker, fp32, deterministic).

    Bugs caught: optimizer moments, EMA, LR step or data position not restored (weights differ, or
    the resumed half sees other rows); noise/timesteps drawn from a stream that restarts.
    """
    from safetensors.torch import load_file

    from flows.cli import main
    from flows.registry import run

    common = [*TRAIN, "train.steps=4", "compute.num_workers=1", "train.batch_size=4"]
    run("train", make_config(inputs, *common, "train.run_id=straight"))
    with pytest.raises(StageError, match="stopped at step 2 of 4"):
        run("train", make_config(inputs, *common, "train.run_id=split", "train.stop_at_step=2"))
    assert not (inputs / "runs" / "split" / "manifest.json").exists()
    assert main(["stage", "train", "--profile", "test", "--workdir", str(inputs), "--resume", "split"]) == 0
    finals = {}
    for name in ("straight", "split"):
        m = json.loads((inputs / "runs" / name / "manifest.json").read_text())
        assert m["steps"] == 4
        finals[name] = load_file(str(Path(m["checkpoint"].removeprefix("file://")) / "state.safetensors"))
    assert finals["straight"].keys() == finals["split"].keys()
    for k, v in finals["straight"].items():
        assert torch.allclose(v.float(), finals["split"][k].float(), atol=1e-6, rtol=0), k
    seen = {n: {s: r["keys"] for s, r in _last_by_step(_audit(inputs / "runs" / n)[0]).items()} for n in finals}
    assert seen["straight"] == seen["split"]


def test_a_budgeted_run_trains_what_a_run_of_its_count_would_and_its_resume_never_times_again(cluster, inputs):
    """A budget too short for 8 steps gets the floor (4), timed in the workers; stopped at 2 and resumed.

    Bugs caught: the timing steps left in the weights or the optimizer (the run differs from one
    configured with 4 steps and the same shortened warm-up and EMA window); a resumed run that times
    again (it would record a new count) or trains the configured 8.
    """
    from safetensors.torch import load_file

    from flows.cli import main
    from flows.registry import run
    from ldm.budget import BUDGET_FILE

    common = [*TRAIN, "compute.num_workers=1", "train.batch_size=4"]
    tight = "budget={minutes: 1, min_scale: 0.5, stages: {train: {seconds: 0.001, after_s: 0}}}"
    run("train", make_config(inputs, *common, "train.steps=4", "train.warmup_steps=1", "train.ema_decay=0.998",
                             "train.run_id=four"))  # fmt: skip
    with pytest.raises(StageError, match="stopped at step 2 of 4"):
        run("train", make_config(inputs, *common, "train.steps=8", tight, "train.run_id=timed", "train.stop_at_step=2"))
    recorded = json.loads((inputs / BUDGET_FILE).read_text())["train"]
    (record,) = recorded.values()
    assert record["steps"] == 4 and record["full_steps"] == 8 and record["step_s"] > 0
    (inputs / BUDGET_FILE).unlink()
    assert main(["stage", "train", "--profile", "test", "--workdir", str(inputs), "--resume", "timed"]) == 0
    assert not (inputs / BUDGET_FILE).exists()  # the resumed run took its count from its checkpoint
    finals = {}
    for name in ("four", "timed"):
        m = json.loads((inputs / "runs" / name / "manifest.json").read_text())
        assert m["steps"] == 4
        finals[name] = load_file(str(Path(m["checkpoint"].removeprefix("file://")) / "state.safetensors"))
    assert m["budget"]["steps"] == 4
    for k, v in finals["four"].items():
        assert torch.allclose(v.float(), finals["timed"][k].float(), atol=1e-6, rtol=0), k


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.batch_size=6", "train.grad_accum=2"], "batch_size 6 is not divisible by compute.num_workers 2"),
        (
            ["unet.size=sd2-base", "unet.cross_attention_dim=1024"],
            "UNet cross_attention_dim 1024 != text state width 128",
        ),
        (["vae.path=/elsewhere/vae"], "were made with the VAE .* the config names /elsewhere/vae"),
        (["clip.arch=ViT-B-32", "clip.weights=/w.pt"], "made with the text encoder tiny:.* names ViT-B-32:/w.pt"),
        (["text_encoder.blocks=0"], "after the penultimate block, the config names text_encoder.blocks=0"),
        (["text_encoder.blocks=[0,3]"], r"names text_encoder.blocks=\[0, 3\] \(0 block\(s\) and 3 block\(s\), side by"),
    ],
)
def test_bad_plans_are_refused_before_any_worker(inputs, overrides, message):
    """Each refusal is one line naming both values, and nothing is written to the run folder.

    Bugs caught: a check that runs only inside the workers (after Ray started them), or that
    compares the wrong fields and lets mismatched latents train.
    """
    from flows.registry import run

    cfg = make_config(inputs, *TRAIN, "train.run_id=refused", *overrides)
    with pytest.raises(StageError, match=message) as info:
        run("train", cfg)
    assert "\n" not in str(info.value)
    assert not (inputs / "runs" / "refused").exists()


def test_streaming_with_every_cpu_held_by_workers_is_refused(cluster, inputs, monkeypatch):
    """Latents too large to hold in the object store stream from Parquet; if the CPU workers hold all
    the cluster's CPUs (2 workers on this 2-CPU cluster) Ray Data's read tasks never run.

    Bug caught: the run waiting forever (seen: 14 minutes with no step) instead of a one-line refusal
    naming compute.num_workers, before the run folder is begun.
    """
    from flows.registry import run
    from ldm.train import driver

    monkeypatch.setattr(driver, "MATERIALIZE_BYTES", 0)  # as if the latents were over the 2 GiB it holds
    cfg = make_config(inputs, *TRAIN, "train.run_id=streamed", "compute.num_workers=2")
    with pytest.raises(StageError, match="hold all 2 CPUs of the Ray cluster.*compute.num_workers below 2"):
        run("train", cfg)
    assert not (inputs / "runs" / "streamed").exists()


def test_zero_workers_and_foreign_run_folder_are_refused(inputs):
    """Zero workers fail at config load; a run folder begun by another config is not trained into.

    Bugs caught: a run id reused with other settings silently mixing two runs' checkpoints.
    """
    from flows.registry import run

    with pytest.raises(ConfigError, match="compute.num_workers"):
        make_config(inputs, "compute.num_workers=0")
    cfg = make_config(inputs, *TRAIN, "train.run_id=foreign")
    manifest.begin(storage.join(Workdir.of(cfg).url, "runs", "foreign"), "train", "0123456789abcdef")
    with pytest.raises(StageError, match="different config 0123456789abcdef"):
        run("train", cfg)


def test_checkpoint_round_trip_and_nonfinite_refusal(tmp_path):
    """save_state/load_state restore weights, EMA and AdamW moments; NaN weights are never written.

    Bugs caught: moments lost on resume (the first resumed step differs); a NaN checkpoint saved.
    """
    from ldm.train.state import Ema, load_state, lr_at, save_state

    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    ema, opt = Ema(net, 0.9, 0), torch.optim.AdamW(net.parameters(), lr=0.1)
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    ema.update(net, 1)
    save_state(tmp_path, net, ema, opt, {"step": 1})
    net2 = torch.nn.Linear(3, 2)
    ema2, opt2 = Ema(net2, 0.9, 0), torch.optim.AdamW(net2.parameters(), lr=0.1)
    assert load_state(tmp_path, net2, ema2, opt2)["step"] == 1
    assert torch.equal(net.weight, net2.weight) and torch.equal(ema.shadow["bias"], ema2.shadow["bias"])
    assert torch.equal(opt.state[net.weight]["exp_avg"], opt2.state[net2.weight]["exp_avg"])
    with torch.no_grad():
        net.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        save_state(tmp_path / "x", net, ema, opt, {"step": 2})
    assert lr_at(0, 1.0, 2, 10, "cosine") == 0.5 and lr_at(9, 1.0, 2, 10, "constant") == 1.0
    assert lr_at(10, 1.0, 2, 10, "cosine") == pytest.approx(0.0)


def test_nonfinite_steps_are_skipped_then_stop_the_run(cluster, inputs):
    """An absurd LR blows the weights up after step 1: later steps are non-finite, skipped, and after
    two in a row the run stops naming the step; every checkpoint written holds finite weights.

    Bugs caught: NaN gradients applied (weights become NaN and get checkpointed); a run that spins on
    NaN forever instead of stopping; an error that does not say where it stopped.
    """
    from safetensors.torch import load_file

    from flows.registry import run

    cfg = make_config(
        inputs, *TRAIN, "train.run_id=nan", "compute.num_workers=1", "train.batch_size=4", "train.lr=1e30",
        "train.warmup_steps=0", "train.max_nonfinite_steps=2", "train.checkpoint_every=1", "train.max_failures=0",
    )  # fmt: skip
    with pytest.raises(StageError, match="2 non-finite steps in a row, the last at step 3") as info:
        run("train", cfg)
    assert "\n" not in str(info.value)
    checkpoints = sorted((inputs / "runs" / "nan").glob("checkpoint_*/state.safetensors"))
    assert checkpoints
    for f in checkpoints:
        assert all(torch.isfinite(v).all() for v in load_file(str(f)).values() if v.is_floating_point())


def test_workers_get_absolute_workdir_and_tracking_store(tmp_path, monkeypatch):
    """Bug caught: a relative workdir (the demo's `work/local`) handed to Ray workers, which start in their own
    folders: their SQLite MLflow store is then another, empty file and the run id the driver made is not found."""
    from ldm.train.driver import worker_config

    monkeypatch.chdir(tmp_path)
    cfg = make_config("work/local")
    got = worker_config(cfg)
    assert got["workdir"] == f"file://{tmp_path}/work/local"
    assert got["tracking"]["uri"] == f"sqlite:///{tmp_path}/work/local/mlflow.db"
    assert cfg.workdir == "work/local"  # the driver's own config is left as the user wrote it
