"""Typed pipeline configuration: one pydantic schema, a section per stage, YAML profiles plus overrides."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

# A knob: a setting that changes how fast or where a stage runs, not what it writes. Stages leave knobs
# out of their output's identity (ldm/stage.py), so a killed run resumes under other parallelism.
KNOB = {"identity": False}


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class BrokenRows(Section):
    """How many deliberately broken rows of each kind the synthetic source mixes in."""

    http_404: int = Field(2, ge=0)
    connection_refused: int = Field(2, ge=0)
    slow_response: int = Field(1, ge=0)
    not_an_image: int = Field(2, ge=0)
    truncated_jpeg: int = Field(2, ge=0)
    zero_bytes: int = Field(2, ge=0)
    decompression_bomb: int = Field(1, ge=0)
    duplicate_url: int = Field(2, ge=0)
    empty_caption: int = Field(2, ge=0)
    invalid_utf8_caption: int = Field(2, ge=0)
    opted_out: int = Field(1, ge=0, description="good images served with `X-Robots-Tag: noai`")


class SyntheticSource(Section):
    """The embedded default's LAION-style world: rendered, captioned, rated images served on 127.0.0.1."""

    kind: Literal["synthetic"] = "synthetic"
    num_samples: int = Field(2000, ge=10, le=1_000_000, description="good rows (broken rows come on top)")
    seed: int = 0
    image_size: int = Field(96, ge=16, le=1024, description="short side of the rendered originals, px")
    broken: BrokenRows = BrokenRows()
    delay_ms: int = Field(0, ge=0, le=10_000, description="server-side delay per image, to simulate latency")


class ParquetSource(Section):
    """A real URL list: LAION / Re-LAION / DataComp metadata parquet files on any fsspec store."""

    kind: Literal["parquet"] = "parquet"
    paths: list[str] = Field(min_length=1, description="parquet files or folders of them (fsspec URLs)")


class Columns(Section):
    """Maps the source parquet's column names onto what ingest needs; extras travel into each sample's JSON."""

    url: str = "URL"
    caption: str = "TEXT"
    extra: list[str] = ["WIDTH", "HEIGHT", "rating", "similarity", "pwatermark", "punsafe"]


class IngestConfig(Section):
    """img2dataset download of the URL list into webdataset shards under W/raw/."""

    resolution: int = Field(64, ge=8, le=4096)
    resize_mode: Literal["center_crop", "keep_ratio", "border", "no"] = "center_crop"
    columns: Columns = Columns()
    url_policy: Literal["public", "loopback"] = Field(
        "public", description="public: only public unicast http(s) hosts; loopback: only 127.0.0.1"
    )
    samples_per_shard: int = Field(1000, ge=1)
    processes: int = Field(1, ge=1, json_schema_extra=KNOB)
    threads: int = Field(16, ge=1, json_schema_extra=KNOB)
    # Which rows succeed is decided by the network, not reproducibly by these two: a rerun with the same
    # values gets other transient failures. Each shard's outcomes are counted in its stats, so they are knobs
    # (raising the timeout to finish a resume must not throw finished shards away).
    timeout_s: float = Field(10.0, gt=0, json_schema_extra=KNOB)
    retries: int = Field(0, ge=0, le=10, json_schema_extra=KNOB)
    encode_quality: int = Field(95, ge=1, le=100)
    max_image_area: int = Field(40_000_000, ge=1, description="pixels; larger declared images are dropped")


class ClipConfig(Section):
    """The CLIP model: an open_clip architecture with weights by local path, or the tiny one train-clip makes."""

    arch: str = Field("tiny", description="'tiny' (trained by train-clip) or an open_clip name, e.g. ViT-H-14")
    weights: str | None = Field(None, description="local open_clip checkpoint for a named arch; never downloaded")
    # Size of the tiny model the embedded default trains.
    embed_dim: int = Field(128, ge=8)
    # open_clip's ModifiedResNet learns these small synthetic scenes faster per CPU-second than a ViT
    # (4,000 local samples: 0.46 vs 0.44 held-out top-1 in 176 s vs 246 s); the ViT stays one --set away.
    vision: Literal["resnet", "vit"] = "resnet"
    vision_width: int | None = Field(
        None, ge=8, description="ResNet stem width (its last stage is 32x wider) or ViT width; None: 16 / 128"
    )
    vision_layers: int | None = Field(
        None, ge=1, description="ResNet: bottleneck blocks in each of its 4 stages; ViT: blocks; None: 1 / 4"
    )
    patch_size: int = Field(8, ge=2, description="ViT only")
    text_width: int = Field(128, ge=16)
    text_layers: int = Field(4, ge=1)
    context_length: int = Field(32, ge=8, le=77)  # synthetic captions: at most 30 tokens with SOT/EOT
    # Training (embedded default only).
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=2)
    lr: float = Field(1e-3, gt=0)
    eval_samples: int = Field(500, ge=100, description="held-out samples rendered for the retrieval report")


class TextEncoderConfig(Section):
    """The frozen text encoder the UNet is conditioned on (tau); SD 2 uses OpenCLIP ViT-H-14's text tower.

    A different model from the filter's scorer CLIP in SD 2, so it has its own section.
    """

    arch: str | None = Field(
        "same", description="'same' (or null): the `clip` model (the tiny one train-clip makes); or an open_clip name"
    )
    weights: str | None = Field(None, description="local open_clip checkpoint for a named arch; never downloaded")
    blocks: NonNegativeInt | list[NonNegativeInt] | None = Field(
        None,
        description="text transformer blocks run before the final LayerNorm; None: all but the last (SD 2's "
        "penultimate layer); 0: the token and position embeddings alone; a list: the states after each of "
        "those depths side by side along the width (e.g. [0, 3])",
    )

    @field_validator("blocks")
    @classmethod
    def _some_depth(cls, v: int | list[int] | None) -> int | list[int] | None:
        if isinstance(v, list) and not v:
            raise ValueError("name at least one depth, or null for the penultimate layer")
        return v

    @property
    def same_as_clip(self) -> bool:
        """Whether the text encoder is the `clip` section's model rather than a model of its own."""
        return self.arch in (None, "same")

    @model_validator(mode="after")
    def _named_arch_needs_weights(self) -> TextEncoderConfig:
        if self.arch == "tiny":
            raise PydanticCustomError(
                "text_encoder_arch", "text_encoder.arch 'tiny': use 'same' for the tiny CLIP train-clip makes"
            )
        if not self.same_as_clip and not self.weights:
            raise PydanticCustomError(
                "text_encoder_weights",
                f"text_encoder.arch {self.arch!r} needs text_encoder.weights (a local open_clip checkpoint file)",
            )
        return self


class AestheticConfig(Section):
    """The LAION aesthetic MLP on L2-normalised CLIP image embeddings."""

    weights: str | None = Field(None, description="e.g. sac+logos+ava1-l14-linearMSE.pth; None = trained")
    input_size: int | None = Field(
        None, ge=1, description="the MLP's input width (the public LAION MLP: 768); None = the scorer CLIP's width"
    )
    epochs: int = Field(200, ge=1)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(256, ge=2)
    holdout: float = Field(0.2, gt=0, lt=1, description="fraction of rated samples kept for the Spearman report")


class FilterConfig(Section):
    """Which raw samples reach W/filtered/: thresholds on the scores."""

    aesthetic_min: float = Field(5.0, ge=0, le=10)
    similarity_min: float = Field(0.0, ge=-1, le=1, description="CLIP image-text cosine; LAION-2B used 0.28 (B/32)")
    min_size: int = Field(0, ge=0, description="minimum original short side, px")
    pwatermark_max: float = Field(0.8, ge=0, le=1)
    punsafe_max: float = Field(0.5, ge=0, le=1)
    batch_size: int = Field(256, ge=1, json_schema_extra=KNOB)  # scores equal up to float rounding


class VaeConfig(Section):
    """The KL autoencoder: a diffusers AutoencoderKL folder in prod, trained by train-vae otherwise."""

    path: str | None = Field(None, description="diffusers-layout folder; None = trained by train-vae")
    downsample: Literal[2, 4, 8] = 4
    block_channels: list[int] = Field([32, 64, 64], min_length=2, max_length=4)
    layers_per_block: int = Field(1, ge=1)
    latent_channels: int = Field(4, ge=1)
    # Training (embedded default only).
    steps: int = Field(1000, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    kl_weight: float = Field(1e-6, ge=0)
    l2_weight: float = Field(0.0, ge=0, description="weight of an L2 term next to L1 in the reconstruction loss")
    edge_weight: float = Field(
        0.0, ge=0, description="weight of an L1 on the error's horizontal and vertical pixel differences (edges)"
    )
    crop: int | None = Field(
        32, ge=8, description="train on random crops of this many px (None or >= resolution: whole images)"
    )
    # LPIPS joins the loss only when both public weight files are given (nothing is downloaded).
    lpips_vgg: str | None = Field(None, description="torchvision VGG16 checkpoint, e.g. vgg16-397923af.pth")
    lpips_lin: str | None = Field(None, description="the lpips package's weights/v0.1/vgg.pth")
    lpips_weight: float = Field(1.0, ge=0)

    @model_validator(mode="after")
    def _downsample_matches_blocks(self) -> VaeConfig:
        if (self.lpips_vgg is None) != (self.lpips_lin is None):
            raise ValueError("LPIPS needs both lpips_vgg and lpips_lin (or neither)")
        if self.path is None and 2 ** (len(self.block_channels) - 1) != self.downsample:
            raise ValueError(
                f"downsample {self.downsample} needs {self.downsample.bit_length()} block_channels, "
                f"got {len(self.block_channels)}"
            )
        return self


class PrecomputeConfig(Section):
    """Ray Data precompute of VAE latents and text embeddings into W/latents/."""

    latent: Literal["mean", "sample"] = Field("mean", description="store the posterior mean, or a seeded sample")
    batch_size: int = Field(
        256, ge=1, description="rows per encoder call (CPU actors encode them 16 at a time)", json_schema_extra=KNOB
    )
    actors: int | None = Field(
        None, ge=1, description="encoder actors; None = one per CPU core (per GPU on GPUs)", json_schema_extra=KNOB
    )
    half: bool = Field(
        True, description="VAE in half precision: fp16 on a GPU, bf16 on a CPU with AMX or AVX512-BF16; else fp32"
    )
    object_store_mb: int = Field(
        512, ge=64, description="object store of a locally started Ray cluster", json_schema_extra=KNOB
    )


class TrackingConfig(Section):
    """MLflow: where runs are logged."""

    uri: str | None = Field(None, description="tracking URI; None = sqlite:///<workdir>/mlflow.db (local workdir)")
    experiment: str = "ldm-pipeline"


class ComputeConfig(Section):
    """Where the heavy stages run."""

    use_gpu: bool = False
    num_workers: int = Field(2, ge=1)
    ray_address: str | None = Field(None, description="existing Ray cluster; None = start a local one")
    forward_env: list[str] = Field(
        default_factory=list,
        description="names of environment variables sent to a remote Ray cluster (opt-in: none by default; "
        "a remote cluster should have its own credentials); a locally started cluster inherits the environment",
    )


BUDGETED_STAGES = ("train-vae", "train")  # the stages that size their own step counts to a time budget, in flow order


class StageBudget(Section):
    """One training stage's part of a time budget (ldm/budget.py)."""

    seconds: float = Field(
        gt=0, description="its training steps' seconds when it runs alone; in a flow, its weight in the time left"
    )
    after_s: float = Field(
        ge=0, description="seconds kept, when it starts, for the flow's work after its steps that no budget sizes"
    )


class BudgetConfig(Section):
    """How long a flow may take on this CPU, and how its training stages share the time (ldm/budget.py).

    Each stage in `stages` times a few of its own training steps where it runs (workers, threads,
    precision) and trains as many as its seconds allow, never more than its configured steps.
    """

    minutes: float = Field(
        gt=0, description="the whole flow, first line of `ldm run` to its last, install not included"
    )
    stages: dict[Literal["train-vae", "train"], StageBudget] = Field(min_length=1)
    min_scale: float = Field(
        0.25, gt=0, le=1, description="never fewer than this fraction of the configured steps (the run then overshoots)"
    )
    deadline: float | None = Field(
        None, description="set by the flow: the Unix time it should end by; None = each stage gets its `seconds`"
    )


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
    diffusion: DiffusionConfig = Field(default_factory=lambda: DiffusionConfig())
    unet: UnetConfig = Field(default_factory=lambda: UnetConfig())
    train: TrainConfig = Field(default_factory=lambda: TrainConfig())
    evaluate: EvaluateConfig = Field(default_factory=lambda: EvaluateConfig())
    budget: BudgetConfig | None = None

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
    return Path(os.environ.get("LDM_CONF_DIR", Path(__file__).resolve().parents[1] / "conf"))


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
        return PipelineConfig.model_validate(tree)
    except ValidationError as err:
        raise _first_error(err) from None


def to_yaml(cfg: PipelineConfig) -> str:
    """The resolved config as YAML, in schema order."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


class DiffusionConfig(Section):
    """The forward process and training objective of the latent diffusion UNet."""

    schedule: Literal["linear", "scaled_linear", "cosine"] = Field(
        "scaled_linear", description="beta schedule: DDPM's linear, SD's scaled_linear, or Nichol-Dhariwal cosine"
    )
    timesteps: int = Field(1000, ge=2, le=10_000, description="training timesteps T")
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    zero_terminal_snr: bool = Field(False, description="rescale betas so that SNR(T) = 0 (Lin et al. 2024)")
    snr_gamma: float | None = Field(5.0, gt=0, description="min-SNR-gamma loss weighting; None = plain MSE")
    offset_noise: float = Field(0.0, ge=0, le=1, description="std of the per-channel noise offset; 0 = off")

    @model_validator(mode="after")
    def _zero_snr_needs_v(self) -> DiffusionConfig:
        # At SNR 0 the latent is pure noise: an epsilon prediction says nothing about x0, and every
        # sampler's x0 = (z - sqrt(1-abar) eps) / sqrt(abar) divides by zero (Lin et al. 2024, sec. 3.2).
        if self.zero_terminal_snr and self.prediction_type != "v_prediction":
            raise ValueError("zero_terminal_snr needs prediction_type v_prediction (epsilon gives no x0 at SNR 0)")
        return self


class UnetConfig(Section):
    """The denoising UNet: a named size from ldm.unet.UNET_SIZES."""

    size: Literal["micro", "tiny", "small", "sd2-base"] = "tiny"
    cross_attention_dim: int | None = Field(
        None, ge=1, description="None: the text encoder's width, read from the latents (SD 2 base: ViT-H's 1024)"
    )


class TrainConfig(Section):
    """Ray Train DDP of the UNet on W/latents/: optimisation, EMA, checkpoints, precision, fault injection."""

    run_id: str = Field("default", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", description="run folder W/runs/<id>")
    steps: int = Field(2000, ge=1, description="optimizer steps")
    batch_size: int = Field(64, ge=1, description="global batch per optimizer step (all workers, all micro-steps)")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(100, ge=0)
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float | None = Field(1.0, gt=0, description="max global grad norm; None = no clipping")
    cfg_dropout: float = Field(0.1, ge=0, le=1, description="probability a caption becomes the empty prompt")
    ema_decay: float = Field(0.999, ge=0, lt=1)
    ema_warmup: int = Field(100, ge=0, description="steps over which the EMA decay ramps up to ema_decay")
    checkpoint_every: int = Field(500, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(50, ge=1)
    # auto: bf16 autocast on a GPU, and on a CPU with native bf16 (AMX or AVX512-BF16): the tiny UNet step
    # (16x16x4, batch 64, 2 threads) took 0.35 s in bf16 vs 0.53 s in fp32 on an AMD EPYC without AMX.
    mixed_precision: Literal["auto", "bf16", "fp32"] = "auto"  # not "no": YAML reads that as false
    grad_checkpointing: bool = False
    compile: bool = False
    max_nonfinite_steps: int = Field(5, ge=1, description="stop after this many non-finite steps in a row")
    max_failures: int = Field(1, ge=0, description="worker-group restarts from the last checkpoint")
    shuffle_buffer: int = Field(256, ge=0, description="rows in each worker's local shuffle buffer; 0 = none")
    sample_prompts: list[str] = Field(
        ["a red circle on a white background", "a blue square on a black background"],
        description="fixed prompts of the sample grid logged at each checkpoint",
    )
    sample_steps: int = Field(20, ge=1)
    guidance: float = Field(4.0, ge=1)
    fail_at_step: int | None = Field(
        None, ge=1, description="tests: the last rank kills its own process once, just after this step"
    )
    stop_at_step: int | None = Field(
        None, ge=1, description="checkpoint and stop here; `ldm stage train --resume <run>` continues"
    )
    audit: bool = Field(False, description="record each rank's sample keys per step and final weights digest")


# Fields that steer a run but do not change what it computes: left out of the run's identity, so a
# stopped or restarted run continues under the same config hash.
TRAIN_CONTROL = ("run_id", "fail_at_step", "stop_at_step", "max_failures", "log_every", "audit")


class EvaluateConfig(Section):
    """The evaluation sweep of a training run: guidance x steps x sampler x checkpoint, FD, CLIP score, judge."""

    guidance: list[float] = Field([1, 1.5, 2, 3, 4, 6, 8], min_length=1, description="classifier-free guidance scales")
    steps: list[int] = Field([20], min_length=1, description="sampler steps")
    samplers: list[Literal["ddim", "dpm++"]] = Field(["ddim"], min_length=1)
    checkpoints: list[Literal["ema", "raw"]] = Field(
        ["ema"], min_length=1, description="weights of the run's latest checkpoint: the EMA average or the raw ones"
    )
    prompt_count: int = Field(256, ge=2, le=100_000, description="held-out prompts (and real images) per point")
    prompt_seed: int = Field(0, description="which held-out samples give the prompts")
    prompts_file: str | None = Field(
        None, description="one prompt per line instead of held-out captions (no FD reference, no judge)"
    )
    reference: str | None = Field(
        None,
        description="webdataset shards (jpg + txt) of held-out real images: the FD reference and, without "
        "prompts_file, the prompts (prod: e.g. COCO-2014 val); None on the synthetic source: its held-out renders",
    )
    extractor: Literal["clip", "inception"] = Field("clip", description="FD feature space (ldm.metrics.features)")
    inception_weights: str | None = Field(
        None, description="local FID InceptionV3 state dict (torchvision layout) for extractor inception"
    )
    # Not a knob: each batch of prompts draws its noise from one generator, so the batch size shapes the images.
    batch_size: int = Field(64, ge=1)
    best_rule: Literal["fd", "fd_clip_floor"] = Field(
        "fd_clip_floor",
        description="fd: lowest FD; fd_clip_floor: lowest FD of the points with clip_score >= clip_floor",
    )
    clip_floor: float = Field(0.0, ge=0, le=100)
    registered_model: str = Field("ldm-pipeline", min_length=1, description="MLflow Model Registry name")
    # auto: bf16 autocast for sampling on a GPU and on CPUs with native bf16 (AMX or AVX512-BF16), where
    # the tiny UNet's guided forward ran 1.5-3x faster than fp32 (AMD EPYC, 2026-11-28); it changes the
    # images, so it is part of every point's identity.
    mixed_precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="sampling precision")
    judge: bool = Field(True, description="train the exact judge on fresh synthetic renders (synthetic source only)")
    judge_samples: int = Field(4000, ge=100, description="labelled renders the judge trains on")
    judge_epochs: int = Field(6, ge=1)

    @field_validator("guidance")
    @classmethod
    def _guidance_valid(cls, v: list[float]) -> list[float]:
        bad = [g for g in v if not g >= 1.0 or g > 100]
        if bad:
            raise ValueError(f"guidance scales must lie in [1, 100] (1 = no guidance), got {bad[0]}")
        if len(set(v)) != len(v):
            raise ValueError("guidance scales repeat")
        return v

    @field_validator("steps")
    @classmethod
    def _steps_valid(cls, v: list[int]) -> list[int]:
        bad = [s for s in v if not 1 <= s <= 1000]
        if bad:
            raise ValueError(f"sampler steps must lie in [1, 1000], got {bad[0]}")
        return v

    @model_validator(mode="after")
    def _extractor_weights(self) -> EvaluateConfig:
        if self.extractor == "inception" and not self.inception_weights:
            raise PydanticCustomError(
                "inception_weights",
                "evaluate.extractor inception needs evaluate.inception_weights (a local FID InceptionV3 file)",
            )
        return self


PipelineConfig.model_rebuild()  # the sections defined after it
