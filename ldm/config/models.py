"""Config sections of the models: CLIP, text encoder, aesthetic MLP, VAE, diffusion, UNet, training, evaluation."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, NonNegativeInt, field_validator, model_validator
from pydantic_core import PydanticCustomError

from ldm.config.base import Section


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

    context_length: int | None = Field(
        None,
        ge=2,
        description="token positions per caption, SOT and EOT included; None: the text model's own (SD 2: 77)",
    )
    mask_padding: bool = Field(
        True,
        description="true: the UNet attends to a caption's own tokens only (the states past its EOT are masked); "
        "false: to every position, padding states included, unmasked: SD 2's convention, the one "
        "StableDiffusionPipeline feeds, so only it round-trips through the export exactly",
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
    """The denoising UNet: a named size from ldm.unet.UNET_SIZES, or the architecture of its initial weights."""

    size: Literal["micro", "tiny", "small", "sd2-base"] = "tiny"
    cross_attention_dim: int | None = Field(
        None, ge=1, description="None: the text encoder's width, read from the latents (SD 2 base: ViT-H's 1024)"
    )
    init_from: str | None = Field(
        None,
        description="initial weights: a diffusers UNet2DConditionModel folder (or a pipeline folder with unet/), "
        "e.g. a Stable Diffusion release, or runs/<run> of this work directory (that run's EMA weights); "
        "the architecture is then theirs and `size` is not used. None: fresh weights of `size`",
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
    # A knob (ldm.config.base.KNOB: not part of the stage's identity): every batch's noise and sampler are
    # its own, so the numbers do not depend on how many actors share the batches.
    actors: int | None = Field(
        None,
        ge=1,
        description="sweep actors (1 GPU each, or 1 CPU); None: one per GPU (or CPU) of the cluster",
        json_schema_extra={"identity": False},
    )
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
