"""Classifier-free guidance in one batched forward pass, the denoising loop, and the samplers built for it."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from ldm.diffusion.objective import ModelFn

SAMPLERS = ("ddim", "dpm++")


def unet_model_fn(unet: UNet2DConditionModel) -> ModelFn:
    """A diffusers UNet as model_fn(z_t, t, encoder_hidden_states, encoder_attention_mask) -> prediction."""

    def fn(z: torch.Tensor, t: torch.Tensor, states: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return unet(z, t, encoder_hidden_states=states, encoder_attention_mask=mask, return_dict=False)[0]

    return fn


def _padded(states: torch.Tensor, mask: torch.Tensor | None, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Zero states behind a False mask: the UNet turns the mask into a -10000 attention bias, which
    # gives padded keys exactly zero weight, so padding does not change the output.
    b, n, d = states.shape
    if mask is None:
        mask = torch.ones((b, n), dtype=torch.bool, device=states.device)
    if n == length:
        return states, mask.bool()
    return (
        torch.cat([states, states.new_zeros((b, length - n, d))], dim=1),
        torch.cat([mask.bool(), mask.new_zeros((b, length - n), dtype=torch.bool)], dim=1),
    )


def guided_eps(
    model_fn: ModelFn,
    z: torch.Tensor,
    t: torch.Tensor | int,
    cond: torch.Tensor,
    mask: torch.Tensor | None,
    uncond: torch.Tensor,
    uncond_mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """pred_u + scale * (pred_c - pred_u) from one forward pass over [uncond; cond] (Ho & Salimans 2022).

    z [B, C, h, w]; cond [B, L, D]; uncond [B or 1, L_u, D] (one empty prompt is broadcast). The
    combination is linear, so it holds for epsilon and v predictions alike.
    """
    b = z.shape[0]
    if uncond.shape[0] == 1 and b > 1:
        uncond = uncond.expand(b, -1, -1)
        uncond_mask = None if uncond_mask is None else uncond_mask.expand(b, -1)
    length = max(cond.shape[1], uncond.shape[1])
    u_states, u_mask = _padded(uncond, uncond_mask, length)
    c_states, c_mask = _padded(cond, mask, length)
    t = torch.as_tensor(t, device=z.device)
    t2 = t.expand(b).repeat(2) if t.ndim == 0 else t.repeat(2)
    pred = model_fn(torch.cat([z, z]), t2, torch.cat([u_states, c_states]), torch.cat([u_mask, c_mask]))
    pred_u, pred_c = pred.chunk(2)
    return pred_u + scale * (pred_c - pred_u)


def _step_kwargs(scheduler: SchedulerMixin, generator: torch.Generator | None) -> dict[str, Any]:
    # As diffusers' pipelines do (prepare_extra_step_kwargs): only stochastic steps take a generator.
    accepted = inspect.signature(scheduler.step).parameters
    return {"generator": generator} if "generator" in accepted else {}


@torch.no_grad()
def sample(
    unet: UNet2DConditionModel,
    scheduler: SchedulerMixin,
    cond: torch.Tensor,
    mask: torch.Tensor | None,
    uncond: torch.Tensor | None,
    uncond_mask: torch.Tensor | None,
    steps: int,
    scale: float,
    generator: torch.Generator | None,
    latent_shape: Sequence[int],
) -> torch.Tensor:
    """Latents [B, *latent_shape] for B prompts, denoised in `steps` scheduler steps with guidance scale.

    The loop is diffusers' StableDiffusionPipeline's: set_timesteps, init_noise_sigma,
    scale_model_input, step(...).prev_sample. scale 1 (or no uncond) runs the conditional model only.
    The scheduler is stateful (multistep solvers keep past outputs); set_timesteps resets it.
    """
    device, dtype = unet.device, unet.dtype
    fn = unet_model_fn(unet)
    scheduler.set_timesteps(steps, device=device)
    shape = (cond.shape[0], *latent_shape)
    latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype) * scheduler.init_noise_sigma
    extra = _step_kwargs(scheduler, generator)
    cond = cond.to(device=device, dtype=dtype)
    mask = None if mask is None else mask.to(device)
    guide = uncond is not None and scale != 1.0
    if guide:
        uncond = uncond.to(device=device, dtype=dtype)
        uncond_mask = None if uncond_mask is None else uncond_mask.to(device)
    for t in scheduler.timesteps:
        z_in = scheduler.scale_model_input(latents, t)
        pred = guided_eps(fn, z_in, t, cond, mask, uncond, uncond_mask, scale) if guide else fn(z_in, t, cond, mask)
        latents = scheduler.step(pred, t, latents, **extra, return_dict=False)[0]
    return latents


def make_sampler(name: str, train_scheduler_config: Any) -> SchedulerMixin:
    """A fresh inference scheduler ("ddim" or "dpm++") from the training scheduler's config.

    Betas, prediction type and zero-terminal-SNR rescaling carry over through from_config.
    """
    if name == "ddim":
        # eta defaults to 0 in step(): deterministic DDIM. clip_sample stays as trained (False for latents).
        return DDIMScheduler.from_config(train_scheduler_config, timestep_spacing="trailing")
    if name == "dpm++":
        # variance_type=None: DDPM's "fixed_small" names a DDPM posterior variance, which DPM-Solver
        # would otherwise inherit; it only understands learned-variance models.
        return DPMSolverMultistepScheduler.from_config(
            train_scheduler_config,
            algorithm_type="dpmsolver++",
            solver_order=2,
            timestep_spacing="trailing",
            variance_type=None,
        )
    raise ValueError(f"unknown sampler {name!r} (have: {', '.join(SAMPLERS)})")
