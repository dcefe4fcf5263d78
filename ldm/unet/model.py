"""The denoising UNet: diffusers' UNet2DConditionModel in named sizes, and a latent/text shape check."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from diffusers import UNet2DConditionModel

# UNet2DConditionModel kwargs per size, minus what the data decides (channels, latent size, text width).
# diffusers' `attention_head_dim` is really the number of heads (huggingface/diffusers#2011): widths / heads
# gives 64-wide heads in SD 2 and 32-wide heads in the CPU sizes.
# CPU training of 16x16x4 latents: attention only at 8x8 (the cross-attention level and the mid block),
# where 64 tokens keep it cheap; 32 groups divide both widths.
_TINY: dict[str, Any] = {
    "block_out_channels": (64, 128),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "layers_per_block": 1,
    "attention_head_dim": (2, 4),
    "norm_num_groups": 32,
    "use_linear_projection": True,
    "default_cross_attention_dim": 128,
}

UNET_SIZES: dict[str, dict[str, Any]] = {
    # The embedded default's: tiny at half the widths (a training step 2.56x cheaper on a CPU), which
    # learns more in the demo's minutes than tiny does in the same (docs/QUALITY.md). Groups of 2 and 4
    # channels, and 32-wide heads as in tiny: two at 8x8, the one level with attention.
    "micro": {**_TINY, "block_out_channels": (32, 64), "attention_head_dim": (1, 2), "norm_num_groups": 16},
    "tiny": _TINY,
    # Three levels (16, 8, 4 for 16x16 latents), cross-attention at the lower two, SD's two
    # resnets per level.
    "small": {
        "block_out_channels": (64, 128, 256),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "layers_per_block": 2,
        "attention_head_dim": (2, 4, 8),
        "norm_num_groups": 32,
        "use_linear_projection": True,
        "default_cross_attention_dim": 128,
    },
    # stabilityai/stable-diffusion-2-base unet/config.json (865.9M parameters, 64x64x4 latents).
    "sd2-base": {
        "block_out_channels": (320, 640, 1280, 1280),
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "layers_per_block": 2,
        "attention_head_dim": (5, 10, 20, 20),
        "norm_num_groups": 32,
        "use_linear_projection": True,
        "default_cross_attention_dim": 1024,
    },
}


def unet_config(
    size: str, latent_channels: int, latent_size: int, cross_attention_dim: int | None = None
) -> dict[str, Any]:
    """The UNet2DConditionModel kwargs of a named size for these latents and text states."""
    if size not in UNET_SIZES:
        raise ValueError(f"unknown UNet size {size!r} (have: {', '.join(UNET_SIZES)})")
    kwargs = dict(UNET_SIZES[size])
    default_dim = kwargs.pop("default_cross_attention_dim")
    return {
        **kwargs,
        "in_channels": latent_channels,
        "out_channels": latent_channels,
        "sample_size": latent_size,
        "cross_attention_dim": default_dim if cross_attention_dim is None else cross_attention_dim,
    }


def build_unet(
    size: str, latent_channels: int, latent_size: int, cross_attention_dim: int | None = None, seed: int | None = None
) -> UNet2DConditionModel:
    """A fresh UNet of a named size (cross_attention_dim None: the size's default).

    With a seed the initial weights are a pure function of it and the global RNG is left untouched.
    """
    config = unet_config(size, latent_channels, latent_size, cross_attention_dim)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        return UNet2DConditionModel(**config)


def training_attention(unet: UNet2DConditionModel, device_type: str) -> None:
    """On a CPU, train with diffusers' plain attention (bmm, softmax, bmm) instead of torch's SDPA.

    SDPA's CPU kernel is flash attention, whose backward is slow on sequences this short (64 latent
    tokens, <= 32 text tokens) in bf16: it was 29% of a tiny-UNet step. Plain attention makes the whole
    bf16 step 1.4x faster on an AMD EPYC, at 1 thread x batch 32 as at 2 x 64; in fp32 the two are
    alike (bench/train_precision.py). Sampling is forward only, where they are within 4%, so it keeps
    SDPA; nothing saved changes (processors are not part of the config).
    """
    if device_type == "cpu":
        from diffusers.models.attention_processor import AttnProcessor

        unet.set_attn_processor(AttnProcessor())


def check_unet_matches(unet_config: Mapping[str, Any], latent_shape: Sequence[int], text_dim: int) -> None:
    """ValueError naming both values if the UNet's in_channels, sample_size or cross_attention_dim disagree.

    latent_shape is (C, h, w) or (B, C, h, w); text_dim is the width D of the text states [B, L, D].
    """
    c, h, w = tuple(latent_shape)[-3:]
    size = unet_config["sample_size"]
    unet_hw = tuple(size) if isinstance(size, Sequence) else (size, size)
    problems = []
    if unet_config["in_channels"] != c:
        problems.append(f"UNet in_channels {unet_config['in_channels']} != latent channels {c}")
    if unet_hw != (h, w):
        problems.append(f"UNet sample_size {size} != latent size {h}x{w}")
    if unet_config["cross_attention_dim"] != text_dim:
        problems.append(f"UNet cross_attention_dim {unet_config['cross_attention_dim']} != text state width {text_dim}")
    if problems:
        raise ValueError("; ".join(problems))
