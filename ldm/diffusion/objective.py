"""The diffusion training objective: forward process, target conversions, min-SNR weights, CFG caption dropout.

Shapes: latents x0, z_t, noise [B, C, h, w]; timesteps t [B] (long); alphas_cumprod (abar) [T];
text states [B, L, D] with a bool mask [B, L] (True on real tokens). Names follow Ho et al. 2020
(q_sample, x0, eps) and Salimans & Ho 2022 (v = sqrt(abar) eps - sqrt(1 - abar) x0).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from diffusers import DDPMScheduler

from ldm.diffusion.schedule import alphas_cumprod_of, gather, snr

PredictionType = Literal["epsilon", "v_prediction"]
# model_fn(z_t, t, encoder_hidden_states, encoder_attention_mask) -> prediction [B, C, h, w]
ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def _coefs(t: torch.Tensor, ac: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
    abar = gather(ac, t, ndim)
    return abar.sqrt(), (1.0 - abar).sqrt()


def q_sample(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """z_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps: a draw from q(z_t | x0)."""
    a, s = _coefs(t, alphas_cumprod, x0.ndim)
    return a * x0 + s * noise


def v_target(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, ac: torch.Tensor) -> torch.Tensor:
    """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0, the v-prediction target."""
    a, s = _coefs(t, ac, x0.ndim)
    return a * noise - s * x0


def eps_to_x0(z_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, ac: torch.Tensor) -> torch.Tensor:
    """x0 = (z_t - sqrt(1 - abar) eps) / sqrt(abar); undefined (division by 0) at zero terminal SNR."""
    a, s = _coefs(t, ac, z_t.ndim)
    return (z_t - s * eps) / a


def x0_to_eps(z_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, ac: torch.Tensor) -> torch.Tensor:
    """eps = (z_t - sqrt(abar) x0) / sqrt(1 - abar); undefined where abar = 1."""
    a, s = _coefs(t, ac, z_t.ndim)
    return (z_t - a * x0) / s


def v_to_x0(z_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor, ac: torch.Tensor) -> torch.Tensor:
    """x0 = sqrt(abar) z_t - sqrt(1 - abar) v; finite at every t, zero terminal SNR included."""
    a, s = _coefs(t, ac, z_t.ndim)
    return a * z_t - s * v


def v_to_eps(z_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor, ac: torch.Tensor) -> torch.Tensor:
    """eps = sqrt(1 - abar) z_t + sqrt(abar) v; finite at every t."""
    a, s = _coefs(t, ac, z_t.ndim)
    return s * z_t + a * v


def eps_to_v(z_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, ac: torch.Tensor) -> torch.Tensor:
    """v = (eps - sqrt(1 - abar) z_t) / sqrt(abar), from v's definition with x0 eliminated."""
    a, s = _coefs(t, ac, z_t.ndim)
    return (eps - s * z_t) / a


def x0_to_v(z_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, ac: torch.Tensor) -> torch.Tensor:
    """v = (sqrt(abar) z_t - x0) / sqrt(1 - abar), from v's definition with eps eliminated."""
    a, s = _coefs(t, ac, z_t.ndim)
    return (a * z_t - x0) / s


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: PredictionType) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023) for an epsilon or v target, finite for snr in [0, inf].

    Both are min(snr, gamma) on the x0 loss, rewritten for the target actually regressed:
    epsilon: min(snr, gamma) / snr, computed as min(1, gamma / snr), so snr = 0 (zero terminal SNR
    at t=T) gives 1, the limit from above, not 0/0; snr = inf gives 0.
    v: min(snr, gamma) / (snr + 1), which is 0 at snr = 0 (that step then adds no gradient, the
    paper's formula taken literally) and 0 at snr = inf.
    """
    snr = snr.float()
    if prediction_type == "epsilon":
        return (gamma / snr).clamp(max=1.0)  # gamma / 0 = inf -> 1
    if prediction_type == "v_prediction":
        return snr.clamp(max=gamma) / (snr + 1.0)  # at inf: gamma / inf = 0, never inf / inf
    raise ValueError(f"unknown prediction_type {prediction_type!r} (have: epsilon, v_prediction)")


def add_offset_noise(noise: torch.Tensor, offset: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """noise + offset * N(0, 1) drawn per sample and channel, constant over h, w (Guttenberg 2023).

    The shared offset lets the model move an image's mean brightness, which plain noise almost never
    changes at high t.
    """
    if offset == 0:
        return noise
    b, c = noise.shape[:2]
    shift = torch.randn((b, c), generator=generator, device=noise.device, dtype=noise.dtype)
    return noise + offset * shift.reshape(b, c, *(1,) * (noise.ndim - 2))


def training_losses(
    model_fn: ModelFn,
    x0: torch.Tensor,
    t: torch.Tensor,
    cond: torch.Tensor,
    mask: torch.Tensor | None,
    noise: torch.Tensor,
    scheduler_or_alphas: DDPMScheduler | torch.Tensor,
    prediction_type: PredictionType,
    snr_gamma: float | None = None,
    offset_noise: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per-sample weighted MSE [B] (mean over C, h, w) of model_fn's epsilon or v prediction at z_t."""
    ac = alphas_cumprod_of(scheduler_or_alphas).to(x0.device)
    # The target is the noise actually added: with offset noise that includes the offset.
    eps = add_offset_noise(noise, offset_noise, generator)
    z_t = q_sample(x0, eps, t, ac)
    if prediction_type == "epsilon":
        target = eps
    elif prediction_type == "v_prediction":
        target = v_target(x0, eps, t, ac)
    else:
        raise ValueError(f"unknown prediction_type {prediction_type!r} (have: epsilon, v_prediction)")
    pred = model_fn(z_t, t, cond, mask)
    loss = (pred.float() - target.float()).pow(2).mean(dim=tuple(range(1, x0.ndim)))
    if snr_gamma is None:
        return loss
    return loss * min_snr_weights(snr(ac, t), snr_gamma, prediction_type)


def fit_to_length(states: torch.Tensor, n_real: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One prompt's states [L_e, D] padded with zeros or cut to [length, D], and its mask [length]."""
    out = states.new_zeros((length, states.shape[-1]))
    keep = min(length, states.shape[0])
    out[:keep] = states[:keep]
    mask = torch.arange(length, device=states.device) < min(n_real, length)
    return out, mask


def apply_cfg_dropout(
    text: torch.Tensor,
    mask: torch.Tensor | None,
    empty: torch.Tensor,
    p: float,
    generator: torch.Generator | None = None,
    empty_len: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Classifier-free-guidance caption dropout: each row becomes the empty prompt with probability p.

    text [B, L, D], mask [B, L] (None: all real), empty [L_e, D] with empty_len real tokens (None: all).
    Returns new (text, mask, dropped [B] bool); kept rows are untouched. Deterministic given the
    generator, which must live on text's device.
    """
    b, length, _ = text.shape
    if mask is None:
        mask = torch.ones((b, length), dtype=torch.bool, device=text.device)
    dropped = torch.rand((b,), generator=generator, device=text.device) < p
    e_states, e_mask = fit_to_length(empty.to(text), empty.shape[0] if empty_len is None else empty_len, length)
    sel = dropped[:, None, None]
    text = torch.where(sel, e_states.expand_as(text), text)
    mask = torch.where(sel[..., 0], e_mask.expand_as(mask), mask.bool())
    return text, mask, dropped
