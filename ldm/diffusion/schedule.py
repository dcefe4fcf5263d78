"""Noise schedules: the training DDPMScheduler built from DiffusionConfig, and SNR(t) from its alphas."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from diffusers import DDPMScheduler

if TYPE_CHECKING:  # the config is only read here; importing it at runtime would pull pydantic into pure math
    from ldm.config import DiffusionConfig

# Our names -> diffusers' beta_schedule names.
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
# Beta ranges are for T=1000: DDPM's (Ho et al. 2020) for linear, Stable Diffusion's for scaled_linear.
# The cosine schedule ignores them.
BETA_RANGES = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012)}
REFERENCE_T = 1000


def make_noise_scheduler(cfg: DiffusionConfig) -> DDPMScheduler:
    """The training scheduler: betas, prediction type and zero-terminal-SNR rescale from the config."""
    if cfg.schedule not in BETA_SCHEDULES:
        raise ValueError(f"unknown beta schedule {cfg.schedule!r} (have: {', '.join(BETA_SCHEDULES)})")
    # improved-diffusion's rule: scale the per-step betas by 1000/T so that abar_T, and with it the
    # noise level the sampler starts from, stays roughly the same when T changes.
    scale = REFERENCE_T / cfg.timesteps
    beta_start, beta_end = BETA_RANGES.get(cfg.schedule, (1e-4, 0.02))
    return DDPMScheduler(
        num_train_timesteps=cfg.timesteps,
        beta_start=beta_start * scale,
        beta_end=min(beta_end * scale, 0.999),
        beta_schedule=BETA_SCHEDULES[cfg.schedule],
        prediction_type=cfg.prediction_type,
        rescale_betas_zero_snr=cfg.zero_terminal_snr,
        # Latents are not images in [-1, 1]: diffusers' default x0 clipping would distort them at
        # every sampling step of any scheduler built from this config (SD ships clip_sample=False).
        clip_sample=False,
        # Trailing spacing makes samplers start at t=T-1, the pure-noise step that zero-terminal SNR
        # trains; "leading" never visits it (Lin et al. 2024, sec. 3.3). Only samplers read this.
        timestep_spacing="trailing",
    )


def alphas_cumprod_of(scheduler_or_alphas: DDPMScheduler | torch.Tensor) -> torch.Tensor:
    """abar_t [T]: a tensor is returned as is; a scheduler gives its alphas_cumprod."""
    if isinstance(scheduler_or_alphas, torch.Tensor):
        return scheduler_or_alphas
    return scheduler_or_alphas.alphas_cumprod


def gather(values: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """values[t] for a batch of timesteps t [B], shaped [B, 1, ..., 1] to broadcast over an ndim tensor."""
    out = values.to(t.device)[t.long()]
    return out.reshape(out.shape + (1,) * (ndim - out.ndim))


def snr(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio abar_t / (1 - abar_t) at timesteps t [B].

    Returned as computed: exactly 0 at t=T under zero-terminal SNR, and inf wherever abar_t is 1.
    Callers that divide by it (min-SNR weights) must stay finite themselves.
    """
    abar = alphas_cumprod.to(t.device)[t.long()]
    return abar / (1.0 - abar)
