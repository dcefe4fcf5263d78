"""`ldm plan`: what a profile would run, with what, and roughly how many hours, touching nothing.

Reads only the config and the stage registry: no file, bucket, Ray cluster or MLflow server is opened, and
neither torch nor ray is imported. On a GPU profile it prices ingest, filter, precompute, train and evaluate
at the source's row count: rows / (throughput per node or GPU) = node- or GPU-hours, then hours on the nodes
or GPUs the profile gives the stage. Each throughput comes from the table below with its source, measured
here or published (and labelled so); a stage without a figure says so rather than guess.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from flows.endpoints import RAY_STAGES
from flows.registry import STAGES
from ldm.config import PipelineConfig, latent_resolution, phase_configs
from ldm.stage import Workdir, resolve


@dataclass(frozen=True)
class Throughput:
    """A recorded throughput for one stage, valid where the config matches `when` (dotted path -> value):
    `per_s` items (URLs, images) per second on one `unit` of hardware (a GPU, or a CPU node)."""

    stage: str
    when: dict[str, object]
    per_s: float
    unit: str
    source: str
    item: str = "images"


# The first whose `when` matches wins: measured ones (docs/PERFORMANCE.md) before external anchors, which stay
# labelled as such.
THROUGHPUTS = (
    Throughput(
        stage="ingest",
        when={"source.kind": "parquet"},
        per_s=1000.0,
        unit="16-core node",
        item="samples",
        source=(
            "published, not measured here: img2dataset's LAION-5B guide (dataset_examples/laion5B.md), "
            "10 worker nodes of 16 cores (c6i.4xlarge) at ~1,000 samples/s each"
        ),
    ),
    Throughput(
        stage="train",
        when={
            "unet.size": "sd2-base",
            "latent_resolution": 256,  # px of the images encoded (precompute.resolution, else ingest's)
            "train.compile": True,
            "train.grad_checkpointing": False,
        },  # fmt: skip
        per_s=466.1,
        unit="H200",
        source="measured: bench/gpu_train.py --compile, 64 per GPU, bf16, one H200, 2026-11-28 (docs/PERFORMANCE.md)",
    ),
    Throughput(
        stage="train",
        when={"unet.size": "sd2-base", "latent_resolution": 256},
        per_s=137.0,
        unit="A100",
        source=(
            "external anchor, not measured here: MosaicML's SD2-base at 256 px, 137 images/s per A100 "
            "(their SD2-base-for-under-$50k run)"
        ),
    ),
)
# Why a stage has no figure: where docs/PERFORMANCE.md (and what was found published) stands on it.
NO_FIGURE = {
    "ingest": "no figure for this source (the published one is img2dataset's, for LAION parquet lists)",
    "filter": (
        "no figure for the scorer CLIP on a GPU (docs/PERFORMANCE.md: CPU figures only; clip-retrieval's "
        "published 1,500 samples/s on an RTX 3080 is ViT-B/32's, not this model's)"
    ),
    "precompute": 'no measured figure (docs/PERFORMANCE.md "GPU": bench/gpu_precompute.py written, not yet run)',
    "train": "no measured figure for this UNet size and resolution (docs/PERFORMANCE.md: CPU figures only)",
    "evaluate": "no measured figure (docs/PERFORMANCE.md: sampling measured on CPU only)",
}
# Published row counts of the URL lists a parquet source may name (matched against source.paths): a plan-only
# table, since the source section describes where the list is, not how long it is.
PUBLISHED_ROWS = {
    "relaion2B-en-research-safe": (
        2_100_000_000,
        "published, not counted here: the Hugging Face dataset page of laion/relaion2B-en-research-safe, "
        "2.1B rows (rounded)",
    ),
}
# img2dataset's guide ran 10 such nodes; no config field sizes ingest's CPU nodes, so the plan shows that many.
INGEST_NODES = 10
PRICED = ("ingest", "filter", "precompute", "train", "evaluate")


def _source(cfg: PipelineConfig) -> str:
    src = cfg.source
    return ", ".join(src.paths) + " (url+caption parquet)" if src.kind == "parquet" else "synthetic source (127.0.0.1)"


def _ingest(cfg: PipelineConfig) -> str:
    i = cfg.ingest
    return (f"Ray tasks: prepare one per parquet file, then one img2dataset download per shard x 1 CPU "
            f"({i.processes} shards in flight, {i.threads} threads each, {i.shard_retries} retries), "
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
    kind = "GPU" if cfg.compute.use_gpu else "CPU"
    n = cfg.filter.actors or f"one per cluster {kind}"
    per = "1 GPU + 1 CPU" if cfg.compute.use_gpu else "1 CPU"
    return (f"Ray Data: scorer actors, {n} x {per}, a shard per call; {cfg.clip.arch} CLIP + aesthetic MLP, "
            f"batches of {cfg.filter.batch_size}")  # fmt: skip


def _driver(cfg: PipelineConfig) -> str:
    """What each Ray stage's job driver asks for: it only hands out work and gathers small results."""
    c = cfg.compute
    if not c.ray_address:
        return "in the flow's process on a local Ray it starts; with RAY_ADDRESS set, a Ray job there"
    asks = [f"{c.job_cpus:g} CPU", *(f"{v:g} {k}" for k, v in sorted(c.job_resources.items()))]
    where = "" if c.job_cpus > 0 or c.job_resources else " (may run on a head with 0 CPUs)"
    return f"a Ray job whose driver asks for {' + '.join(asks)}{where}"


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
    per = "1 GPU" if cfg.compute.use_gpu else "1 CPU"
    n = e.actors or f"one per cluster {'GPU' if cfg.compute.use_gpu else 'CPU'}"
    return (f"Ray actors: {n} x {per}, sampling batches of {e.batch_size}; sweep of {points} points (guidance x "
            f"steps x sampler x checkpoint) + the untrained baseline x {e.prompt_count} prompts; "
            f"{e.extractor} features")  # fmt: skip


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
    def value(path: str) -> object:
        return latent_resolution(cfg) if path == "latent_resolution" else resolve(cfg, path)

    return all(value(path) == want for path, want in t.when.items())


def figure(stage: str, cfg: PipelineConfig) -> Throughput | None:
    """The first recorded throughput of the stage that matches the config, or None."""
    return next((t for t in THROUGHPUTS if t.stage == stage and _matches(t, cfg)), None)


def source_rows(cfg: PipelineConfig) -> tuple[int, str] | None:
    """The rows the source holds and where that number comes from; None for a list of unknown length."""
    src = cfg.source
    if src.kind == "synthetic":
        return src.num_samples, "source.num_samples"
    for name, (rows, origin) in PUBLISHED_ROWS.items():
        if any(name in path for path in src.paths):
            return rows, origin
    return None


def _gpus(stage: str, cfg: PipelineConfig) -> tuple[int, str]:
    """How many GPUs a stage's actors (or workers) use, and which setting says so."""
    if stage == "train":
        return cfg.compute.num_workers, "compute.num_workers"
    actors = getattr(getattr(cfg, stage), "actors", None)
    if actors:
        return actors, f"{stage}.actors"
    return cfg.compute.num_workers, f"one actor per cluster GPU; compute.num_workers = {cfg.compute.num_workers}"


def _evaluate_work(cfg: PipelineConfig) -> tuple[int, str]:
    """The sweep's images and the words for them: every grid point plus the untrained baseline, all prompts."""
    e = cfg.evaluate
    points = [(s, g) for _ in e.checkpoints for _ in e.samplers for s in e.steps for g in e.guidance]
    points.append((e.steps[0], e.guidance[0]))  # the untrained baseline (ldm.evaluate.stage.grid_points)
    images = len(points) * e.prompt_count
    forwards = sum(s * (1 if g == 1 else 2) for s, g in points) * e.prompt_count  # guidance: two per step
    return images, (f"{len(points)} points (with the untrained baseline) x {e.prompt_count:,} prompts = "
                    f"{images:,} images, {forwards:,} UNet evaluations")  # fmt: skip


def estimate(stage: str, cfg: PipelineConfig) -> str:
    """One stage's line: its work / the throughput per node or GPU = node- or GPU-hours, the hours on the
    nodes or GPUs the profile gives it, and the figure's source; or the work and why there is no figure."""
    known = source_rows(cfg)
    if stage == "train":
        tc = cfg.train
        count = tc.steps * tc.batch_size
        work = f"{tc.steps:,} steps x {tc.batch_size:,} = {count:,} images"
    elif stage == "evaluate":
        count, work = _evaluate_work(cfg)
    elif known is None:
        return f"no row count for {', '.join(cfg.source.paths)}: add its published count to PUBLISHED_ROWS"
    else:
        count = known[0]
        work = {"ingest": f"{count:,} rows", "filter": f"at most {count:,} images (every row downloaded)",
                "precompute": f"at most {count:,} rows (every image kept)"}[stage]  # fmt: skip
    if stage == "ingest":
        n, where = INGEST_NODES, "nodes (the guide's count: no config field sizes ingest's CPU nodes)"
    else:
        n, why = _gpus(stage, cfg)
        where = f"GPUs ({why})"
    t = figure(stage, cfg)
    if t is None:
        return f"{work} on {n} {where}: {NO_FIGURE[stage]}"
    unit_hours = count / t.per_s / 3600
    return (f"{work} / {t.per_s:,g} {t.item}/s per {t.unit} = {unit_hours:,.0f} {t.unit}-hours; "
            f"~{unit_hours / n:,.0f} h at linear scaling on {n} {where}; source: {t.source}")  # fmt: skip


def _priced(stage: str, cfg: PipelineConfig) -> str:
    """A stage's estimate; train's is each phase's in turn when the config has phases."""
    if stage != "train" or not cfg.phases:
        return estimate(stage, cfg)
    return "; then ".join(
        f"{p.train.run_id} at {latent_resolution(p)} px: {estimate(stage, p)}" for p in phase_configs(cfg)
    )


def plan(cfg: PipelineConfig, profile: str) -> str:
    """The plan as text: every registry stage in order, its inputs, output folder and resources; on a GPU
    profile the hours of the stages whose work grows with the data, at the source's row count."""
    wd = Workdir.of(cfg)
    ray = cfg.compute.ray_address or "a local Ray cluster started by the job"
    lines = [
        f"ldm plan: profile {profile}; nothing is read, written or started",
        f"work directory: {wd.url}",
        f"Ray: RAY_ADDRESS if set, else {ray}; GPUs: {'yes' if cfg.compute.use_gpu else 'no'}",
        "",
    ]
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
        if stage.name in RAY_STAGES:
            lines.append(f"   job:       {_driver(cfg)}")
    if cfg.phases:
        lines += ["", "Phases: precompute and train once per phase, in order; evaluate sweeps the last phase's run:"]
        for phase in phase_configs(cfg):
            pw, t = Workdir.of(phase), phase.train
            start = f"from {phase.unet.init_from}" if phase.unet.init_from else f"a fresh {phase.unet.size} UNet"
            lines.append(f"  {t.run_id}: {latent_resolution(phase)} px latents in {pw.output('precompute')}; "
                         f"{t.steps} steps x global batch {t.batch_size}, {start}")  # fmt: skip
    if not cfg.compute.use_gpu:
        return (
            "\n".join([*lines, "", "Hours (estimated): none: this profile runs on CPUs (compute.use_gpu is false)"])
            + "\n"
        )
    known = source_rows(cfg)
    rows = f"{known[0]:,} rows; row count: {known[1]}" if known else "an unknown row count"
    lines += ["", f"Hours (estimated) at {rows}:"]
    lines += [f"  {name}: {_priced(name, cfg)}" for name in PRICED]
    return "\n".join(lines) + "\n"
