"""Typed pipeline configuration: one pydantic schema, a section per stage, YAML profiles plus overrides.

The sections live by concern (data.py: the data stages; models.py: the models and their training;
run.py: tracking, compute, the budget); this module assembles them into PipelineConfig, validates what
spans sections, and loads profiles. Every name is importable from `ldm.config`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from ldm.config.base import KNOB, Section
from ldm.config.data import (
    BrokenRows,
    Columns,
    FilterConfig,
    IngestConfig,
    ParquetSource,
    PrecomputeConfig,
    SyntheticSource,
)
from ldm.config.models import (
    TRAIN_CONTROL,
    AestheticConfig,
    ClipConfig,
    DiffusionConfig,
    EvaluateConfig,
    TextEncoderConfig,
    TrainConfig,
    UnetConfig,
    VaeConfig,
)
from ldm.config.run import BUDGETED_STAGES, BudgetConfig, ComputeConfig, StageBudget, TrackingConfig

__all__ = [
    "BUDGETED_STAGES", "KNOB", "TRAIN_CONTROL", "AestheticConfig", "BrokenRows", "BudgetConfig", "ClipConfig",
    "Columns", "ComputeConfig", "ConfigError", "DiffusionConfig", "EvaluateConfig", "FilterConfig", "IngestConfig",
    "ParquetSource", "PipelineConfig", "PrecomputeConfig", "Section", "StageBudget", "SyntheticSource",
    "TextEncoderConfig", "TrackingConfig", "TrainConfig", "UnetConfig", "VaeConfig", "check_resolution",
    "latent_resolution", "phase_configs", "phase_overrides",
    "load_config", "open_clip_embed_dim", "parse_override", "profiles", "set_dotted", "to_yaml",
]  # fmt: skip


class PipelineConfig(Section):
    """The whole pipeline: one work directory URL and a section per stage."""

    workdir: str = "work/local"
    seed: int = 0
    source: Annotated[SyntheticSource | ParquetSource, Field(discriminator="kind")] = SyntheticSource()
    ingest: IngestConfig = IngestConfig()
    clip: ClipConfig = ClipConfig()
    text_encoder: TextEncoderConfig = TextEncoderConfig()
    aesthetic: AestheticConfig = AestheticConfig()
    filter: FilterConfig = FilterConfig()
    vae: VaeConfig = VaeConfig()
    precompute: PrecomputeConfig = PrecomputeConfig()
    compute: ComputeConfig = ComputeConfig()
    tracking: TrackingConfig = TrackingConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    unet: UnetConfig = UnetConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    budget: BudgetConfig | None = None
    phases: list[dict[str, Any]] = Field(
        default_factory=list,
        description="training phases the flow runs in order after train-vae, each a precompute and a train run "
        "with its own settings as dotted keys (precompute.resolution, train.run_id, train.steps, ...); a phase "
        "after the first starts from the previous one's EMA weights (unet.init_from: runs/<its run>) unless it "
        "names its own; evaluate sweeps the last. Empty: one precompute and one train run, as configured",
    )

    @field_validator("workdir")
    @classmethod
    def _workdir_is_url_or_path(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v

    @model_validator(mode="after")
    def _components_fit(self) -> PipelineConfig:
        # Refused here, before any stage runs, rather than in train-clip or train-aesthetic after ingest has run.
        check_resolution(self.ingest.resolution, self.clip, self.vae)
        check_latent_resolution(self)
        check_aesthetic_width(self)
        check_no_credentials(self)
        return self


def check_resolution(resolution: int, clip: ClipConfig, vae: VaeConfig) -> None:
    """Refuse an ingest.resolution the tiny CLIP's vision tower or the trained VAE cannot take whole."""
    if clip.arch == "tiny":  # a named arch resizes to its own image size, so any resolution works
        # ModifiedResNet downsamples 32x before its attention pool; a ViT cuts the image into patches.
        step, why = (32, "clip.vision=resnet downsamples 32x") if clip.vision == "resnet" else (
            clip.patch_size, f"clip.patch_size is {clip.patch_size}")  # fmt: skip
        if resolution % step:
            raise ValueError(
                f"ingest.resolution {resolution} is not a multiple of {step} ({why}); "
                f"use {max(step, resolution // step * step)} or {(resolution // step + 1) * step}"
            )
    if vae.path is None and resolution % vae.downsample:  # a given VAE's factor is only known from its folder
        raise ValueError(
            f"ingest.resolution {resolution} is not a multiple of vae.downsample {vae.downsample}; "
            "the latents would not cover the image"
        )


def latent_resolution(cfg: PipelineConfig) -> int:
    """The px of the images precompute encodes: precompute.resolution, else ingest.resolution."""
    return cfg.precompute.resolution or cfg.ingest.resolution


def check_latent_resolution(cfg: PipelineConfig) -> None:
    """Refuse a precompute.resolution above what ingest keeps, or one the trained VAE cannot take whole."""
    res = cfg.precompute.resolution
    if res is None:
        return
    if res > cfg.ingest.resolution:
        raise PydanticCustomError(
            "precompute_resolution",
            f"precompute.resolution {res} is above ingest.resolution {cfg.ingest.resolution}: the images are kept "
            "at ingest.resolution, so ingest at the largest resolution any phase needs",
        )
    if cfg.vae.path is None and res % cfg.vae.downsample:
        raise PydanticCustomError(
            "precompute_resolution",
            f"precompute.resolution {res} is not a multiple of vae.downsample {cfg.vae.downsample}; "
            "the latents would not cover the image",
        )


class ConfigError(ValueError):
    """A config problem, with the dotted path of the field at fault."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}" if path else reason)
        self.path = path
        self.reason = reason


def open_clip_embed_dim(arch: str) -> int | None:
    """The embedding width of an open_clip architecture from its model config, or None if unknown.

    Read without importing open_clip (which loads torch, and flows/ never does): the registry of an
    open_clip already imported in this process (it sees add_model_config), else the JSON the package ships.
    """
    if ":" in arch or "/" in arch:  # hf-hub: / local-dir: names: open_clip would read (or download) them
        return None
    loaded = sys.modules.get("open_clip")
    if loaded is not None:
        model_cfg = loaded.get_model_config(arch)
        return int(model_cfg["embed_dim"]) if model_cfg else None
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "model_configs" / f"{arch}.json"
    return int(json.loads(path.read_text())["embed_dim"]) if path.is_file() else None


# scheme://user:password@host: a password written into a URL
_URL_PASSWORD = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/@\s]*:[^/@\s]*@")


def _strings(node: Any, path: str = "") -> list[tuple[str, str]]:
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in _strings(v, f"{path}.{k}" if path else k)]
    if isinstance(node, list):
        return [s for i, v in enumerate(node) for s in _strings(v, f"{path}[{i}]")]
    return [(path, node)] if isinstance(node, str) else []


def check_no_credentials(cfg: PipelineConfig) -> None:
    """Refuse a URL carrying a password in any field: the config is printed, recorded in every manifest
    and logged as MLflow params, so credentials must come from the environment instead."""
    for path, value in _strings(cfg.model_dump(mode="json")):
        if _URL_PASSWORD.match(value):
            raise PydanticCustomError(
                "credential",
                f"{path} has a password in its URL; the config is printed, recorded in manifests and logged to "
                "MLflow, so pass credentials in the environment instead (AWS_*, MLFLOW_TRACKING_USERNAME/_PASSWORD)",
            )


def check_aesthetic_width(cfg: PipelineConfig) -> None:
    """Refuse an aesthetic MLP whose input width differs from the scorer CLIP's embedding width, when both are known."""
    want = cfg.aesthetic.input_size
    if want is None:
        return
    have = cfg.clip.embed_dim if cfg.clip.arch == "tiny" else open_clip_embed_dim(cfg.clip.arch)
    if have is not None and have != want:
        # A custom error type: pydantic would prefix a ValueError's text with "Value error, ".
        raise PydanticCustomError(
            "aesthetic_width",
            f"aesthetic.input_size {want} != the embedding width {have} of clip.arch {cfg.clip.arch!r}: "
            "the MLP scores that CLIP's image embeddings (the public LAION MLP wants 768, OpenAI ViT-L-14)",
        )


def conf_dir() -> Path:
    """Folder holding the YAML profiles (LDM_CONF_DIR, else the repository's conf/)."""
    return Path(os.environ.get("LDM_CONF_DIR", Path(__file__).resolve().parents[2] / "conf"))


def profiles() -> list[str]:
    """Names of the profiles that exist."""
    return sorted(p.stem for p in conf_dir().glob("*.yaml"))


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise ConfigError(dotted, f"'{k}' is a value, not a section")
        node = child
    node[keys[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """Split one `a.b=c` override; the value is read as YAML so numbers and lists get their types."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(item, "override must look like a.b=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(key.strip(), f"value {raw!r} is not valid YAML ({e.__class__.__name__})") from e
    return key.strip(), value


def _first_error(err: ValidationError) -> ConfigError:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"] if not (isinstance(p, str) and p in ("synthetic", "parquet")))
    msg = e["msg"].removeprefix("Value error, ")  # a validator's own message is already the reason
    if e["type"] == "extra_forbidden":
        msg = "unknown key"
    elif "input" in e and e["type"] not in ("missing",) and not isinstance(e["input"], dict):
        msg = f"{msg} (got {e['input']!r})"
    return ConfigError(loc, msg)


def load_config(profile: str, overrides: list[str] | None = None, workdir: str | None = None) -> PipelineConfig:
    """Load conf/<profile>.yaml, apply `a.b=c` overrides and --workdir, and validate the result."""
    path = conf_dir() / f"{profile}.yaml"
    if not path.is_file():
        raise ConfigError("profile", f"unknown profile {profile!r} (have: {', '.join(profiles())})")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError("profile", f"{path} is not valid YAML: {e}") from e
    if not isinstance(tree, dict):
        raise ConfigError("profile", f"{path} must hold a mapping")
    for item in overrides or []:
        key, value = parse_override(item)
        if key == "source.kind" and (tree.get("source") or {}).get("kind") != value:
            tree["source"] = {}  # switching kind: the profile's fields belong to the other kind
        set_dotted(tree, key, value)
    if workdir is not None:
        tree["workdir"] = workdir
    try:
        cfg = PipelineConfig.model_validate(tree)
    except ValidationError as err:
        raise _first_error(err) from None
    check_phases(tree, cfg)
    return cfg


def phase_overrides(cfg: PipelineConfig) -> list[list[str]]:
    """Each phase as `a.b=value` overrides: its own keys, then unet.init_from the previous phase's run."""
    out, previous = [], None
    for phase in cfg.phases:
        sets = [f"{key}={json.dumps(value)}" for key, value in phase.items()]
        if previous is not None and "unet.init_from" not in phase:
            sets.append(f"unet.init_from=runs/{previous}")
        out.append(sets)
        previous = phase.get("train.run_id")
    return out


def phase_configs(cfg: PipelineConfig) -> list[PipelineConfig]:
    """The config of each phase: this one with the phase's overrides applied."""
    tree = cfg.model_dump(mode="json")
    return [PipelineConfig.model_validate(_phase_tree(tree, sets, i)) for i, sets in enumerate(phase_overrides(cfg))]


def _phase_tree(tree: dict[str, Any], sets: list[str], i: int) -> dict[str, Any]:
    """A copy of a config tree with phase i's overrides applied."""
    out = json.loads(json.dumps(tree))
    for key, value in (parse_override(item) for item in sets):
        if key == "phases" or key.startswith("phases."):
            raise ConfigError(f"phases[{i}]", "a phase cannot hold phases")
        set_dotted(out, key, value)
    return out


def check_phases(tree: dict[str, Any], cfg: PipelineConfig) -> None:
    """Refuse a phase that would not load, or phases that share a run (the second would overwrite the first)."""
    runs = []
    for i, sets in enumerate(phase_overrides(cfg)):
        if "train.run_id" not in cfg.phases[i]:
            raise ConfigError(f"phases[{i}]", "each phase names its train.run_id (its runs/<id> folder)")
        runs.append(cfg.phases[i]["train.run_id"])
        try:
            PipelineConfig.model_validate(_phase_tree(tree, sets, i))
        except ValidationError as err:
            e = _first_error(err)
            raise ConfigError(f"phases[{i}]" + (f".{e.path}" if e.path else ""), e.reason) from None
    if len(set(runs)) != len(runs):
        raise ConfigError(
            "phases", f"two phases share train.run_id {sorted(r for r in runs if runs.count(r) > 1)[0]!r}"
        )


def to_yaml(cfg: PipelineConfig) -> str:
    """The resolved config as YAML, in schema order."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
