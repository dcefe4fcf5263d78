"""Diffusion math: SNR, forward process, target conversions, min-SNR weights, CFG dropout, guidance, sampling."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler, EulerDiscreteScheduler

from ldm.config import DiffusionConfig
from ldm.diffusion import (
    add_offset_noise,
    apply_cfg_dropout,
    eps_to_v,
    eps_to_x0,
    guided_eps,
    make_noise_scheduler,
    make_sampler,
    min_snr_weights,
    q_sample,
    sample,
    snr,
    training_losses,
    unet_model_fn,
    v_target,
    v_to_eps,
    v_to_x0,
    x0_to_eps,
    x0_to_v,
)
from ldm.unet import build_unet

T = 1000
TEXT_DIM = 32


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def unet():
    """A seeded tiny UNet on 8x8x4 latents with 32-wide text states: seconds of CPU per test, not minutes."""
    return build_unet("tiny", 4, 8, TEXT_DIM, seed=0).eval()


def zero_snr_alphas() -> torch.Tensor:
    # Built directly: DiffusionConfig refuses epsilon + zero terminal SNR, but the math must still be finite.
    return DDPMScheduler(beta_schedule="scaled_linear", rescale_betas_zero_snr=True).alphas_cumprod


def test_snr_matches_closed_form_for_linear_schedule():
    sched = make_noise_scheduler(DiffusionConfig(schedule="linear", timesteps=T))
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)  # DDPM's schedule, by hand in float64
    abar = torch.cumprod(1 - betas, 0)
    t = torch.tensor([0, 1, 250, 500, 999])
    # Bugs caught: (1-abar)/abar inverted, alphas instead of alphas_cumprod, an off-by-one t index (each
    # is off by >= 1e-2 here). rtol 1e-3: at t=0, 1 - abar = 1e-4 keeps only ~3 digits of a float32 abar.
    torch.testing.assert_close(snr(sched.alphas_cumprod, t).double(), (abar / (1 - abar))[t], rtol=1e-3, atol=0)
    assert snr(sched.alphas_cumprod, t).diff().lt(0).all()  # SNR falls with t


def test_zero_terminal_snr_schedule_ends_at_zero_snr():
    sched = make_noise_scheduler(DiffusionConfig(prediction_type="v_prediction", zero_terminal_snr=True))
    # Bug caught: the zero-SNR flag not reaching diffusers (SNR(T) of plain scaled_linear is ~0.005).
    assert snr(sched.alphas_cumprod, torch.tensor([T - 1])).item() == 0.0
    assert sched.config.clip_sample is False  # clipping x0 to [-1, 1] would distort latents when sampling


def test_epsilon_with_zero_terminal_snr_is_refused():
    # Bug caught: a config whose samplers divide by sqrt(abar_T) = 0 and produce NaN images.
    with pytest.raises(ValueError, match="v_prediction"):
        DiffusionConfig(prediction_type="epsilon", zero_terminal_snr=True)


def test_q_sample_matches_closed_form_and_diffusers():
    sched = make_noise_scheduler(DiffusionConfig(schedule="scaled_linear"))
    ac = sched.alphas_cumprod
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 400, 999])
    z = q_sample(x0, noise, t, ac)
    for i, ti in enumerate(t.tolist()):
        a = ac[ti].item()
        # Bugs caught: abar instead of sqrt(abar), betas/alphas in place of abar, a batch-broadcast slip.
        torch.testing.assert_close(z[i], math.sqrt(a) * x0[i] + math.sqrt(1 - a) * noise[i])
    torch.testing.assert_close(z, sched.add_noise(x0, noise, t))
    torch.testing.assert_close(v_target(x0, noise, t, ac), sched.get_velocity(x0, noise, t))


@pytest.mark.parametrize("zero_snr", [False, True])
def test_eps_v_x0_conversions_round_trip(zero_snr):
    ac = zero_snr_alphas() if zero_snr else make_noise_scheduler(DiffusionConfig()).alphas_cumprod
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(5, 4, 8, 8, generator=g), torch.randn(5, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 500, 990, 998])  # short of T-1: eps -> x0 divides by sqrt(abar_T) there
    z, v = q_sample(x0, eps, t, ac), v_target(x0, eps, t, ac)
    # Bugs caught: a sign flip in v, swapped sqrt(abar)/sqrt(1-abar) in any conversion.
    close = {"rtol": 1e-3, "atol": 2e-3}
    torch.testing.assert_close(v_to_x0(z, v, t, ac), x0, **close)
    torch.testing.assert_close(v_to_eps(z, v, t, ac), eps, **close)
    torch.testing.assert_close(eps_to_v(z, eps, t, ac), v, **close)
    torch.testing.assert_close(eps_to_x0(z, eps, t, ac), x0, **close)
    t_mid = t[1:]  # x0 -> eps divides by sqrt(1 - abar), near 0 at t=0
    z_m, x0_m, eps_m, v_m = z[1:], x0[1:], eps[1:], v[1:]
    torch.testing.assert_close(x0_to_eps(z_m, x0_m, t_mid, ac), eps_m, **close)
    torch.testing.assert_close(x0_to_v(z_m, x0_m, t_mid, ac), v_m, **close)


def test_v_conversions_are_exact_at_zero_terminal_snr():
    ac = zero_snr_alphas()
    x0, eps = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    t = torch.tensor([T - 1, T - 1])
    z, v = q_sample(x0, eps, t, ac), v_target(x0, eps, t, ac)
    # At SNR 0, z = eps and v = -x0: the v parameterisation still names x0 (why zero-SNR needs v).
    torch.testing.assert_close(z, eps)
    torch.testing.assert_close(v_to_x0(z, v, t, ac), x0)


def test_min_snr_weights_at_known_snr():
    s = torch.tensor([0.5, 5.0, 20.0])
    # Bugs caught: max for min, the epsilon formula used for v (or the reverse), 1/(snr+1) missing.
    torch.testing.assert_close(min_snr_weights(s, 5.0, "epsilon"), torch.tensor([1.0, 1.0, 0.25]))
    torch.testing.assert_close(min_snr_weights(s, 5.0, "v_prediction"), torch.tensor([0.5 / 1.5, 5 / 6, 5 / 21]))
    with pytest.raises(ValueError, match="sample"):
        min_snr_weights(s, 5.0, "sample")


def test_min_snr_weights_finite_at_zero_and_infinite_snr():
    s = torch.tensor([0.0, float("inf")])
    # Bug caught: min(snr, gamma) / snr computed literally gives 0/0 = NaN at zero terminal SNR.
    torch.testing.assert_close(min_snr_weights(s, 5.0, "epsilon"), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(min_snr_weights(s, 5.0, "v_prediction"), torch.tensor([0.0, 0.0]))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_training_loss_finite_at_t0_and_T_with_zero_terminal_snr(prediction_type):
    ac = zero_snr_alphas()
    weight = torch.nn.Parameter(torch.tensor(0.5))

    def model_fn(z, t, states, mask):
        return weight * z + states.mean() * 0  # uses every input; a gradient reaches `weight`

    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([0, T - 1])
    cond = torch.randn(2, 3, TEXT_DIM)
    loss = training_losses(model_fn, x0, t, cond, None, noise, ac, prediction_type, snr_gamma=5.0, offset_noise=0.1)
    loss.mean().backward()
    # Bug caught: NaN weights at SNR 0 (eps) or inf SNR feeding the loss; a NaN gradient would poison AdamW.
    assert loss.shape == (2,)
    assert torch.isfinite(loss).all() and torch.isfinite(weight.grad)


def test_training_loss_is_weighted_mse_of_the_right_target():
    sched = make_noise_scheduler(DiffusionConfig(prediction_type="v_prediction"))
    ac = sched.alphas_cumprod
    x0, noise, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([10, 500, 900])
    cond = torch.randn(3, 2, TEXT_DIM)
    zeros = lambda z, t, s, m: torch.zeros_like(z)  # noqa: E731
    loss = training_losses(zeros, x0, t, cond, None, noise, sched, "v_prediction", snr_gamma=5.0)
    expected = v_target(x0, noise, t, ac).pow(2).mean((1, 2, 3)) * min_snr_weights(snr(ac, t), 5.0, "v_prediction")
    # Bugs caught: regressing eps when v was asked for; the weight left out; a mean over the batch.
    torch.testing.assert_close(loss, expected)


def test_offset_noise_is_constant_over_space_per_sample_channel():
    noise = torch.zeros(3, 4, 8, 8)
    out = add_offset_noise(noise, 0.1, torch.Generator().manual_seed(0))
    # Bug caught: offset drawn per pixel (then it is just more white noise) or shared by the batch.
    assert (out == out[:, :, :1, :1]).all()
    assert out[:, :, 0, 0].unique().numel() == 12


def test_cfg_dropout_replaces_exactly_the_chosen_rows():
    g = torch.Generator().manual_seed(0)
    text = torch.randn(16, 6, TEXT_DIM, generator=g)
    mask = torch.arange(6)[None] < torch.randint(1, 7, (16, 1), generator=g)
    empty = torch.randn(2, TEXT_DIM, generator=g)  # SOT + EOT states, shorter than the batch's 6
    new_text, new_mask, dropped = apply_cfg_dropout(text, mask, empty, 0.5, torch.Generator().manual_seed(7))
    assert 0 < dropped.sum() < 16
    # Bug caught: the states replaced but the mask kept (the UNet would attend to zero padding).
    assert torch.equal(new_text[~dropped], text[~dropped]) and torch.equal(new_mask[~dropped], mask[~dropped])
    for i in dropped.nonzero().flatten().tolist():
        assert torch.equal(new_text[i, :2], empty) and not new_text[i, 2:].any()
        assert new_mask[i].tolist() == [True, True, False, False, False, False]
    again = apply_cfg_dropout(text, mask, empty, 0.5, torch.Generator().manual_seed(7))
    assert torch.equal(again[2], dropped) and torch.equal(again[0], new_text)  # deterministic for a seed


def test_cfg_dropout_trims_a_longer_empty_prompt_and_honours_p_bounds():
    text, empty = torch.randn(4, 3, TEXT_DIM), torch.randn(8, TEXT_DIM)  # e.g. SD 2's padded 77-token empty
    out, m, dropped = apply_cfg_dropout(text, None, empty, 1.0, torch.Generator().manual_seed(0), empty_len=2)
    assert dropped.all() and torch.equal(out[0], empty[:3]) and m[0].tolist() == [True, True, False]
    assert not apply_cfg_dropout(text, None, empty, 0.0, torch.Generator())[2].any()


def test_guided_eps_limits_and_one_pass_equals_two(unet):
    fn = unet_model_fn(unet)
    g = torch.Generator().manual_seed(3)
    z, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([999, 400])
    cond = torch.randn(2, 7, TEXT_DIM, generator=g)
    mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    uncond, uncond_mask = torch.randn(1, 3, TEXT_DIM, generator=g), torch.ones(1, 3, dtype=torch.bool)
    with torch.no_grad():
        eps_c = fn(z, t, cond, mask)
        eps_u = fn(z, t, uncond.expand(2, -1, -1), uncond_mask.expand(2, -1))  # unpadded, its own pass
        assert (eps_c - eps_u).abs().max() > 1e-3  # else the checks below could not tell cond from uncond
        # Bugs caught: uncond/cond halves swapped; padding not masked (the 3-token uncond padded to 7).
        torch.testing.assert_close(guided_eps(fn, z, t, cond, mask, uncond, uncond_mask, 1.0), eps_c, atol=1e-5, rtol=0)
        torch.testing.assert_close(guided_eps(fn, z, t, cond, mask, uncond, uncond_mask, 0.0), eps_u, atol=1e-5, rtol=0)
        four = guided_eps(fn, z, t, cond, mask, uncond, uncond_mask, 4.0)
        torch.testing.assert_close(four, eps_u + 4.0 * (eps_c - eps_u), atol=1e-5, rtol=0)


def plain_diffusers_loop(unet, scheduler, cond, uncond, steps, scale, seed, shape):
    """StableDiffusionPipeline's loop, written out as diffusers has it."""
    generator = torch.Generator().manual_seed(seed)
    scheduler.set_timesteps(steps)
    latents = torch.randn(shape, generator=generator) * scheduler.init_noise_sigma
    states = torch.cat([uncond, cond])
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        noise_pred = unet(inp, t, encoder_hidden_states=states).sample
        noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
        noise_pred = noise_pred_uncond + scale * (noise_pred_text - noise_pred_uncond)
        latents = scheduler.step(noise_pred, t, latents).prev_sample
    return latents


@pytest.mark.parametrize("name", ["ddim", "dpm++", "euler"])
def test_sample_is_seeded_and_matches_a_plain_diffusers_loop(unet, name):
    train = make_noise_scheduler(DiffusionConfig(prediction_type="v_prediction", zero_terminal_snr=True))
    # Euler scales its input and starts from sigma_max noise: checks init_noise_sigma and scale_model_input.

    def make():
        return EulerDiscreteScheduler.from_config(train.config) if name == "euler" else make_sampler(name, train.config)

    g = torch.Generator().manual_seed(5)
    cond, uncond = torch.randn(3, 4, TEXT_DIM, generator=g), torch.randn(3, 4, TEXT_DIM, generator=g)
    args = (cond, None, uncond, None, 4, 3.0)
    with torch.no_grad():
        a = sample(unet, make(), *args, torch.Generator().manual_seed(0), (4, 8, 8))
        b = sample(unet, make(), *args, torch.Generator().manual_seed(0), (4, 8, 8))
        c = sample(unet, make(), *args, torch.Generator().manual_seed(1), (4, 8, 8))
        ref = plain_diffusers_loop(unet, make(), cond, uncond, 4, 3.0, 0, (3, 4, 8, 8))
    assert a.shape == (3, 4, 8, 8) and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.allclose(a, c)  # Bug caught: noise drawn from the global RNG.
    torch.testing.assert_close(a, ref, atol=1e-5, rtol=1e-5)  # Bug caught: any drift from diffusers' loop.


def test_make_sampler_carries_the_training_config():
    train = make_noise_scheduler(DiffusionConfig(schedule="cosine", prediction_type="v_prediction"))
    for name in ("ddim", "dpm++"):
        s = make_sampler(name, train.config)
        # Bug caught: a sampler on diffusers' default linear betas or epsilon, unlike the trained model.
        torch.testing.assert_close(s.alphas_cumprod, train.alphas_cumprod)
        assert s.config.prediction_type == "v_prediction"
    assert make_sampler("dpm++", train.config).config.algorithm_type == "dpmsolver++"
    with pytest.raises(ValueError, match="euler"):
        make_sampler("euler", train.config)
