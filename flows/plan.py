"""`ldm plan`: what a profile would run, with what, and roughly how many GPU-hours, touching nothing.

Reads only the config and the stage registry: no file, bucket, Ray cluster or MLflow server is opened, and
neither torch nor ray is imported. GPU-hours come from the throughput table below, each figure with its
source; a stage without a recorded GPU figure says so rather than guess.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from flows.registry import STAGES
from ldm.config import PipelineConfig
from ldm.stage import Stage, Workdir, resolve


@dataclass(frozen=True)
class Throughput:
    """A recorded images/s per GPU for one stage, valid where the config matches `when` (dotted path -> value)."""

    stage: str
    when: dict[str, object]
    images_per_s: float
    gpu: str
    source: str


# Recorded GPU throughputs, the first whose `when` matches wins: measured ones (docs/PERFORMANCE.md) before the
# external anchor, which stays labelled as such.
THROUGHPUTS = (
    Throughput(
        stage="train",
        when={
            "unet.size": "sd2-base",
            "ingest.resolution": 256,
            "train.compile": True,
            "train.grad_checkpointing": False,
        },  # fmt: skip
        images_per_s=466.1,
        gpu="H200",
        source="measured: bench/gpu_train.py --compile, 64 per GPU, bf16, one H200, 2026-11-28 (docs/PERFORMANCE.md)",
    ),
    Throughput(
        stage="train",
        when={"unet.size": "sd2-base", "ingest.resolution": 256},
        images_per_s=137.0,
        gpu="A100",
        source=(
            "external anchor, not measured here: MosaicML's SD2-base at 256 px, 137 images/s per A100 "
            "(their SD2-base-for-under-$50k run)"
        ),
    ),
)
# Why a GPU stage has no figure: where docs/PERFORMANCE.md stands on it.
NO_FIGURE = {
    "precompute": 'no measured figure (docs/PERFORMANCE.md "GPU": bench/gpu_precompute.py written, not yet run)',
    "train": "no measured figure for this UNet size and resolution (docs/PERFORMANCE.md: CPU figures only)",
    "evaluate": "no measured figure (docs/PERFORMANCE.md: sampling measured on CPU only)",
}


def _source(cfg: PipelineConfig) -> str:
    src = cfg.source
    return ", ".join(src.paths) + " (url+caption parquet)" if src.kind == "parquet" else "synthetic source (127.0.0.1)"


def _ingest(cfg: PipelineConfig) -> str:
    i = cfg.ingest
    return (f"img2dataset in the flow's process: {i.processes} processes x {i.threads} threads, "
            f"{i.samples_per_shard} samples/shard, {i.resolution} px")  # fmt: skip


def _clip(cfg: PipelineConfig) -> str:
    c = cfg.clip
    if c.arch != "tiny":
        return f"no compute: registers {c.arch} weights {c.weights}"
    return f"CPU in the flow's process: trains the tiny CLIP, {c.epochs} epochs x batch {c.batch_size}"


def _aesthetic(cfg: PipelineConfig) -> str:
    a = cfg.aesthetic
    if a.weights:
        return f"no compute: registers the MLP {a.weights}"
    return f"CPU in the flow's process: trains the MLP, {a.epochs} epochs x batch {a.batch_size}"


def _filter(cfg: PipelineConfig) -> str:
    return f"CPU in the flow's process: {cfg.clip.arch} CLIP + aesthetic MLP, batches of {cfg.filter.batch_size}"


def _vae(cfg: PipelineConfig) -> str:
    v = cfg.vae
    if v.path:
        return f"no compute: registers the VAE {v.path}"
    return f"CPU in the flow's process: trains the VAE, {v.steps} steps x batch {v.batch_size}"


def _precompute(cfg: PipelineConfig) -> str:
    pc = cfg.precompute
    if cfg.compute.use_gpu:
        n = pc.actors or "one per cluster GPU"
        return f"Ray Data: VAE + text actors, {n} each, 0.5 GPU + 0.5 CPU per actor, batches of {pc.batch_size}"
    n = pc.actors or "one per cluster CPU"
    return f"Ray Data on CPUs: VAE actors {n} x 0.75 CPU, text actors 1 per 8 CPUs, batches of {pc.batch_size}"


def _train(cfg: PipelineConfig) -> str:
    t, c = cfg.train, cfg.compute
    per = "1 GPU" if c.use_gpu else "1 CPU"
    return (f"Ray Train: {c.num_workers} workers x {per} (DDP), {t.steps} steps x global batch {t.batch_size}, "
            f"{t.mixed_precision} precision, {cfg.unet.size} UNet")  # fmt: skip


def _evaluate(cfg: PipelineConfig) -> str:
    e = cfg.evaluate
    points = len(e.guidance) * len(e.steps) * len(e.samplers) * len(e.checkpoints)
    return (f"sweep of {points} points (guidance x steps x sampler x checkpoint) x {e.prompt_count} prompts "
            f"= {points * e.prompt_count:,} images; {e.extractor} features")  # fmt: skip


RESOURCES: dict[str, Callable[[PipelineConfig], str]] = {
    "ingest": _ingest,
    "train-clip": _clip,
    "train-aesthetic": _aesthetic,
    "filter": _filter,
    "train-vae": _vae,
    "precompute": _precompute,
    "train": _train,
    "evaluate": _evaluate,
}


def _matches(t: Throughput, cfg: PipelineConfig) -> bool:
    return all(resolve(cfg, path) == value for path, value in t.when.items())


def gpu_hours(stage: Stage, cfg: PipelineConfig) -> str | None:
    """The stage's GPU-hour estimate with its source, a 'no measured figure' line, or None for a CPU stage."""
    if not cfg.compute.use_gpu or stage.name not in NO_FIGURE:
        return None
    found = [t for t in THROUGHPUTS if t.stage == stage.name and _matches(t, cfg)]
    if not found or stage.name != "train":  # only training's image count is known before the data exists
        return NO_FIGURE[stage.name]
    t, tc, workers = found[0], cfg.train, cfg.compute.num_workers
    images = tc.steps * tc.batch_size
    hours = images / t.images_per_s / 3600
    return (f"{tc.steps:,} steps x {tc.batch_size:,} = {images:,} images / {t.images_per_s:g} images/s per {t.gpu} "
            f"= {hours:,.0f} {t.gpu}-hours (~{hours / workers:,.0f} h on {workers} GPUs at linear scaling); "
            f"source: {t.source}")  # fmt: skip


def plan(cfg: PipelineConfig, profile: str) -> str:
    """The plan as text: every registry stage in order, its inputs, output folder, resources and GPU-hours."""
    wd = Workdir.of(cfg)
    ray = cfg.compute.ray_address or "a local Ray cluster started by the job"
    lines = [
        f"ldm plan: profile {profile}; nothing is read, written or started",
        f"work directory: {wd.url}",
        f"Ray: RAY_ADDRESS if set, else {ray}; GPUs: {'yes' if cfg.compute.use_gpu else 'no'}",
        "",
    ]
    estimates = []
    for i, stage in enumerate(STAGES, 1):
        inputs = [f"{name} ({wd.output(name)})" for name in stage.inputs(cfg)]
        if stage.name == "ingest":
            inputs.append(_source(cfg))
        inputs += [f"{field} = {path}" for field, path in stage.weights(cfg).items()]
        lines += [
            f"{i}. {stage.name}",
            f"   inputs:    {'; '.join(inputs) or 'none'}",
            f"   output:    {wd.output(stage.name)}",
            f"   resources: {RESOURCES[stage.name](cfg)}",
        ]
        estimate = gpu_hours(stage, cfg)
        if estimate:
            estimates.append(f"  {stage.name}: {estimate}")
    lines += ["", "GPU-hours (estimated):"]
    lines += estimates or ["  none: this profile runs on CPUs (compute.use_gpu is false)"]
    return "\n".join(lines) + "\n"
