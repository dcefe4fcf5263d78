"""Diffusion math at its edges: what the schedule carries into diffusers, what the loss hands the network, how
guidance pads and broadcasts, which sampler settings survive from_config. Fast; `make mutation` runs these."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, PNDMScheduler

from ldm.config import DiffusionConfig
from ldm.diffusion import add_offset_noise, guided_eps, make_noise_scheduler, make_sampler, q_sample, training_losses
from ldm.diffusion.guidance import _step_kwargs

D = 8  # text width


def test_schedule_scales_betas_with_T_and_keeps_sd_ranges():
    """Bugs caught: SD's scaled_linear range replaced by DDPM's linear one; T not passed (always 1000 steps);
    betas divided instead of multiplied by 1000/T (improved-diffusion's rule keeps abar_T the same); the cap
    at 0.999 lifted (betas >= 1 zero every later alpha); samplers not told to start at t = T-1."""
    s = make_noise_scheduler(DiffusionConfig(schedule="scaled_linear", timesteps=500))
    assert len(s.betas) == 500 and s.config.num_train_timesteps == 500
    assert s.betas[0].item() == pytest.approx(0.00085 * 2) and s.betas[-1].item() == pytest.approx(0.012 * 2)
    linear = make_noise_scheduler(DiffusionConfig(schedule="linear"))
    assert linear.betas[0].item() == pytest.approx(1e-4) and linear.betas[-1].item() == pytest.approx(0.02)
    capped = make_noise_scheduler(DiffusionConfig(schedule="linear", timesteps=10))  # 0.02 * 100 = 2
    assert capped.betas.max().item() == pytest.approx(0.999) and capped.alphas_cumprod[-1] > 0
    assert s.config.timestep_spacing == "trailing" and s.config.beta_schedule == "scaled_linear"
    bad = DiffusionConfig.model_construct(schedule="quadratic", timesteps=1000)
    with pytest.raises(
        ValueError, match=r"^unknown beta schedule 'quadratic' \(have: linear, scaled_linear, cosine\)$"
    ):
        make_noise_scheduler(bad)


def test_offset_noise_adds_offset_times_a_seeded_draw():
    """Bugs caught: subtracting or dividing by the draw; the generator ignored (not reproducible, and the
    resumed run's noise differs); offset 1 treated as off."""
    noise = torch.zeros(2, 3, 4, 4)
    out = add_offset_noise(noise, 0.5, torch.Generator().manual_seed(0))
    draw = torch.randn((2, 3), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out[:, :, 0, 0], 0.5 * draw)
    assert add_offset_noise(noise, 1.0, torch.Generator().manual_seed(0)).abs().sum() > 0
    assert add_offset_noise(noise, 0.0) is noise


def test_training_losses_hands_the_network_z_t_t_and_mask():
    """Bugs caught: the network called without t or without the text mask (it would attend to padding); the
    offset noise drawn without the generator; pred + target in the MSE; an unknown prediction type accepted."""
    seen = {}

    def model_fn(z, t, states, mask):
        seen.update(z=z, t=t, mask=mask)
        return torch.ones_like(z)

    ac = make_noise_scheduler(DiffusionConfig()).alphas_cumprod
    x0, noise, t = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4), torch.tensor([5, 700])
    cond, mask = torch.randn(2, 3, D), torch.tensor([[True, True, False], [True, False, False]])
    gen = torch.Generator().manual_seed(1)
    loss = training_losses(model_fn, x0, t, cond, mask, noise, ac, "epsilon", offset_noise=0.2, generator=gen)
    eps = add_offset_noise(noise, 0.2, torch.Generator().manual_seed(1))
    assert torch.equal(seen["t"], t) and torch.equal(seen["mask"], mask)
    torch.testing.assert_close(seen["z"], q_sample(x0, eps, t, ac))
    torch.testing.assert_close(loss, (1 - eps).pow(2).mean((1, 2, 3)))
    with pytest.raises(ValueError, match=r"^unknown prediction_type 'sample' \(have: epsilon, v_prediction\)$"):
        training_losses(model_fn, x0, t, cond, mask, noise, ac, "sample")


def _recording_model():
    calls = []

    def fn(z, t, states, mask):
        calls.append({"t": t, "states": states, "mask": mask})
        return torch.zeros_like(z)

    return fn, calls


def test_guided_eps_broadcasts_one_empty_prompt_with_its_mask():
    """Bugs caught: the empty prompt's mask dropped when it is broadcast to the batch (the UNet then attends to
    its padding), or not passed at all; the padded length taken from the text width instead of the token count;
    the timestep not repeated for the two halves; an integer mask passed on as integers."""
    fn, calls = _recording_model()
    z = torch.zeros(2, 4, 4, 4)
    cond, mask = torch.randn(2, 3, D), torch.tensor([[1, 1, 1], [1, 1, 0]])
    uncond, uncond_mask = torch.randn(1, 5, D), torch.tensor([[True, True, False, False, False]])
    guided_eps(fn, z, 7, cond, mask, uncond, uncond_mask, 3.0)
    call = calls[-1]
    assert call["states"].shape == (4, 5, D)  # [uncond; cond], padded to the longer of 3 and 5 tokens
    assert call["mask"].dtype == torch.bool
    assert call["mask"].tolist() == [[True, True, False, False, False]] * 2 + [
        [True, True, True, False, False],
        [True, True, False, False, False],
    ]
    assert call["t"].tolist() == [7, 7, 7, 7]
    guided_eps(fn, z, torch.tensor([1, 2]), cond, None, uncond, None, 3.0)  # no masks: all given tokens real
    assert calls[-1]["mask"].tolist() == [[True] * 5] * 2 + [[True] * 3 + [False] * 2] * 2
    assert calls[-1]["t"].tolist() == [1, 2, 1, 2]


def test_step_kwargs_pass_a_generator_only_to_steps_that_take_one():
    """Bugs caught: a generator passed to a scheduler whose step() has no such argument (TypeError mid-sweep),
    or withheld from a stochastic one (DDPM's step: unseeded, so the sweep is not reproducible)."""
    g = torch.Generator()
    assert _step_kwargs(DDPMScheduler(), g) == {"generator": g}
    assert _step_kwargs(PNDMScheduler(), g) == {}


def test_samplers_override_what_a_pretrained_config_says():
    """Bugs caught: a pretrained SD scheduler config ("leading" spacing, DDPM's fixed_small variance, order 1)
    leaking into our samplers: sampling would skip t = T-1, or DPM-Solver would treat the model as learning
    its variance; an unknown sampler name accepted."""
    sd = DDPMScheduler(timestep_spacing="leading", variance_type="fixed_small").config
    ddim = make_sampler("ddim", sd)
    assert isinstance(ddim, DDIMScheduler) and ddim.config.timestep_spacing == "trailing"
    dpm = make_sampler("dpm++", sd)
    assert dpm.config.timestep_spacing == "trailing" and dpm.config.variance_type is None
    assert dpm.config.solver_order == 2 and dpm.config.algorithm_type == "dpmsolver++"
    with pytest.raises(ValueError, match=r"^unknown sampler 'euler' \(have: ddim, dpm\+\+\)$"):
        make_sampler("euler", sd)
