"""What the machine's processors can do fast, for the choices that depend on it."""

from __future__ import annotations

import torch


def has_amx() -> bool:
    """Whether the CPU has AMX tiles (Intel Sapphire Rapids on): bf16 matrix work 2-3x faster than fp32."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private probe; absent -> assume no AMX
    return bool(amx and amx())


def has_avx512_bf16() -> bool:
    """Whether the CPU has AVX512-BF16 dot products (AMD Zen 4 on, Intel Cooper Lake on)."""
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(probe and probe())


def autocast_dtype(mode: str, device: str) -> torch.dtype | None:
    """The autocast dtype of a mixed_precision setting ("auto", "bf16", "fp32") on a device, or None for fp32.

    auto: bf16 on a GPU, and on a CPU with native bf16 (AMX or AVX512-BF16). On an AMD EPYC with
    AVX512-BF16 and no AMX the tiny UNet's training step (16x16x4 latents, batch 64, 2 threads) took
    0.35 s in bf16 vs 0.53 s in fp32, and its guided sampling forward ran 1.5-3x faster.
    """
    if mode == "fp32":
        return None
    if mode == "bf16" or device == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if native_bf16() else None


def native_bf16() -> bool:
    """Whether bf16 autocast pays on this CPU: AMX, or AVX512-BF16. On an AMD EPYC with AVX512-BF16 and no
    AMX (2026-11-28): one core's VAE encode of 64 px images 1.8-2.2x faster than fp32, the tiny CLIP's
    training step 1.5x (0.092 vs 0.139 s, batch 64, 2 threads). Not the VAE's training step: 1.1x, so
    train-vae stays fp32."""
    return has_amx() or has_avx512_bf16()
