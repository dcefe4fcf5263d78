"""Diffusion math: noise schedules, the training objective, classifier-free guidance and sampling."""

from ldm.diffusion.guidance import guided_eps, make_sampler, sample, unet_model_fn
from ldm.diffusion.objective import (
    add_offset_noise,
    apply_cfg_dropout,
    eps_to_v,
    eps_to_x0,
    min_snr_weights,
    q_sample,
    training_losses,
    v_target,
    v_to_eps,
    v_to_x0,
    x0_to_eps,
    x0_to_v,
)
from ldm.diffusion.schedule import make_noise_scheduler, snr

__all__ = [
    "add_offset_noise",
    "apply_cfg_dropout",
    "eps_to_v",
    "eps_to_x0",
    "guided_eps",
    "make_noise_scheduler",
    "make_sampler",
    "min_snr_weights",
    "q_sample",
    "sample",
    "snr",
    "training_losses",
    "unet_model_fn",
    "v_target",
    "v_to_eps",
    "v_to_x0",
    "x0_to_eps",
    "x0_to_v",
]
