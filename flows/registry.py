"""The stage registry: every stage of the pipeline, in the order they run, described once.

The `ldm` command line and the Prefect flow both read this list. Each entry says what defines the
stage's output (config fields, input stages, weight files); the work itself is a plain function in
`data_prep/` or `ldm/`, named here and imported only when the stage runs.
"""

from __future__ import annotations

from pathlib import Path

from ldm.config import TRAIN_CONTROL, PipelineConfig, TrainConfig
from ldm.stage import Stage, run_stage


def _clip_inputs(cfg: PipelineConfig) -> tuple[str, ...]:
    return ("ingest",) if cfg.clip.arch == "tiny" else ()  # prod: registered by path, nothing to train


def _clip_weights(cfg: PipelineConfig) -> dict[str, str]:
    return {"clip.weights": cfg.clip.weights} if cfg.clip.arch != "tiny" and cfg.clip.weights else {}


def _aesthetic_inputs(cfg: PipelineConfig) -> tuple[str, ...]:
    # The MLP scores CLIP embeddings, so it depends on the CLIP; trained, on the raw ratings too.
    return ("train-clip",) if cfg.aesthetic.weights else ("ingest", "train-clip")


def _aesthetic_weights(cfg: PipelineConfig) -> dict[str, str]:
    return {"aesthetic.weights": cfg.aesthetic.weights} if cfg.aesthetic.weights else {}


def _vae_inputs(cfg: PipelineConfig) -> tuple[str, ...]:
    return () if cfg.vae.path else ("filter",)


def _precompute_inputs(cfg: PipelineConfig) -> tuple[str, ...]:
    # The text encoder comes from train-clip only when it is the `clip` model; else from its own file.
    return ("filter", "train-vae", "train-clip") if cfg.text_encoder.same_as_clip else ("filter", "train-vae")


def _precompute_weights(cfg: PipelineConfig) -> dict[str, str]:
    te = cfg.text_encoder
    return {"text_encoder.weights": te.weights} if not te.same_as_clip and te.weights else {}


def _vae_weights(cfg: PipelineConfig) -> dict[str, str]:
    return {"vae.path": cfg.vae.path} if cfg.vae.path else {}


def _train_weights(cfg: PipelineConfig) -> dict[str, str]:
    # A release's UNet weights by content (replaced at the same path, they make a new run); an earlier run of this
    # work directory (runs/<run>) is identified by that run's manifest instead, in the train manifest's `init`.
    path = cfg.unet.init_from
    if not path or path.startswith("runs/"):
        return {}
    root = Path(path.removeprefix("file://")).expanduser()
    unet = root / "unet" if (root / "unet" / "config.json").is_file() else root
    weights = unet / "diffusion_pytorch_model.safetensors"
    # Not there: the train stage's own check refuses the folder in one line that says what it lacks.
    return {"unet.init_from": str(weights)} if weights.is_file() else {}


def _evaluate_inputs(cfg: PipelineConfig) -> tuple[str, ...]:
    # The scorer CLIP (CLIP score, FD in CLIP space) is train-clip's model on the embedded default.
    return ("train", "train-clip") if cfg.clip.arch == "tiny" else ("train",)


def _evaluate_weights(cfg: PipelineConfig) -> dict[str, str]:
    # Local files whose content defines the sweep; a missing one is a one-line error before any sampling.
    ev, out = cfg.evaluate, {}
    if cfg.clip.arch != "tiny" and cfg.clip.weights:
        out["clip.weights"] = cfg.clip.weights
    if ev.extractor == "inception" and ev.inception_weights:
        out["evaluate.inception_weights"] = ev.inception_weights
    if ev.prompts_file:
        out["evaluate.prompts_file"] = ev.prompts_file
    return out


STAGES: tuple[Stage, ...] = (
    Stage(
        name="ingest",
        fields=("ingest", "source"),
        work="data_prep.ingest:ingest",
        sources="data_prep.ingest.prepare:source_ids",
        summary="data_prep.ingest:summary",
    ),
    Stage(
        name="train-clip",
        fields=("clip", "ingest.resolution", "seed"),
        work="ldm.clip.stage:train_clip_stage",
        summary="ldm.clip.stage:summary",
        inputs=_clip_inputs,
        weights=_clip_weights,
    ),
    Stage(
        name="train-aesthetic",
        fields=("aesthetic", "ingest.resolution", "seed"),
        work="ldm.aesthetic.stage:train_aesthetic_stage",
        summary="ldm.aesthetic.stage:summary",
        inputs=_aesthetic_inputs,
        weights=_aesthetic_weights,
    ),
    Stage(
        name="filter",
        fields=("filter", "ingest.resolution"),
        work="data_prep.filter:filter_stage",
        summary="data_prep.filter:summary",
        inputs=lambda cfg: ("ingest", "train-clip", "train-aesthetic"),
    ),
    Stage(
        name="train-vae",
        fields=("vae", "ingest.resolution", "seed"),
        work="ldm.autoencoder.stage:train_vae_stage",
        summary="ldm.autoencoder.stage:summary",
        inputs=_vae_inputs,
        weights=_vae_weights,
    ),
    Stage(
        name="precompute",
        fields=("precompute", "text_encoder", "ingest.resolution", "seed"),
        work="data_prep.precompute.stage:precompute",
        summary="data_prep.precompute.stage:summary",
        inputs=_precompute_inputs,
        weights=_precompute_weights,
    ),
    Stage(
        name="train",
        fields=(
            "diffusion",
            "unet",
            "seed",
            "compute.num_workers",
            *(f"train.{f}" for f in TrainConfig.model_fields if f not in TRAIN_CONTROL),
        ),
        work="ldm.train.driver:train_stage",
        summary="ldm.train.driver:summary",
        inputs=lambda cfg: ("precompute",),
        weights=_train_weights,
    ),
    Stage(
        name="evaluate",
        fields=("evaluate", "seed", "source", "ingest.resolution", "filter.aesthetic_min"),
        work="ldm.evaluate.stage:evaluate_stage",
        summary="ldm.evaluate.stage:summary",
        inputs=_evaluate_inputs,
        weights=_evaluate_weights,
    ),
)
BY_NAME = {s.name: s for s in STAGES}


def stage(name: str) -> Stage:
    """The registered stage of that name."""
    return BY_NAME[name]


def run(name: str, cfg: PipelineConfig, overwrite: bool = False, allow_partial: bool = False) -> dict:
    """Run one stage through the stage protocol; returns its manifest."""
    return run_stage(BY_NAME[name], cfg, overwrite, allow_partial)
