"""The UNet registry: sizes build and run, SD 2 base's config, seeded builds, latent/text mismatches refused."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

from ldm.config import DiffusionConfig, UnetConfig
from ldm.diffusion import make_noise_scheduler, training_losses, unet_model_fn
from ldm.unet import UNET_SIZES, build_unet, check_unet_matches, unet_config
from ldm.unet.model import training_attention

SD2_BASE_PARAMS = 865_910_724  # stabilityai/stable-diffusion-2-base's UNet


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_registry_matches_the_config_literal():
    # Bug caught: a size the config accepts that the registry cannot build (or the reverse).
    assert set(UNET_SIZES) == set(UnetConfig.model_fields["size"].annotation.__args__)


@pytest.mark.parametrize("size", ["micro", "tiny", "small"])
def test_cpu_sizes_build_and_keep_the_latent_shape(size):
    unet = build_unet(size, 4, 16, 128, seed=0)
    z, text = torch.randn(2, 4, 16, 16), torch.randn(2, 5, 128)
    with torch.no_grad():
        out = unet(z, torch.tensor([0, 999]), encoder_hidden_states=text).sample
    # Bugs caught: out_channels not tied to the latents; a norm group count that does not divide a width.
    assert out.shape == z.shape and torch.isfinite(out).all()
    check_unet_matches(unet.config, (4, 16, 16), 128)


def test_sd2_base_config_is_sd2_base():
    cfg = unet_config("sd2-base", 4, 64)
    assert cfg["cross_attention_dim"] == 1024 and cfg["attention_head_dim"] == (5, 10, 20, 20)
    assert cfg["use_linear_projection"] and cfg["layers_per_block"] == 2
    # Built on the meta device: no memory, no init, well under a second. Bug caught: any slip in the
    # blocks, widths or heads that changes the architecture (SD 2 base's published parameter count).
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg)
    assert sum(p.numel() for p in unet.parameters()) == SD2_BASE_PARAMS


def test_latent_and_text_mismatches_are_refused_naming_both_values():
    cfg = build_unet("tiny", 4, 16, 128, seed=0).config
    # Bug caught: a UNet silently built for other latents or another text encoder's width.
    with pytest.raises(ValueError, match=r"in_channels 4 != latent channels 8"):
        check_unet_matches(cfg, (8, 16, 16), 128)
    with pytest.raises(ValueError, match=r"sample_size 16 != latent size 32x32"):
        check_unet_matches(cfg, (2, 4, 32, 32), 128)
    with pytest.raises(ValueError, match=r"cross_attention_dim 128 != text state width 1024"):
        check_unet_matches(cfg, (4, 16, 16), 1024)
    with pytest.raises(ValueError, match="unknown UNet size 'huge'"):
        build_unet("huge", 4, 16, 128)


def test_seeded_build_is_a_pure_function_of_the_seed():
    state = torch.random.get_rng_state()
    a, b = build_unet("tiny", 4, 8, 32, seed=3).state_dict(), build_unet("tiny", 4, 8, 32, seed=3).state_dict()
    c = build_unet("tiny", 4, 8, 32, seed=4).state_dict()
    # Bugs caught: the seed ignored, or the global RNG consumed/reseeded (it would change data order).
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_training_attention_matches_sdpa_and_keeps_the_text_mask():
    """The CPU training processor computes what SDPA does, padded text tokens included.

    Bugs caught: a processor that drops encoder_attention_mask (padding would then steer the
    cross-attention: the model would train on one function and sample with another), or a swap that
    reaches the GPU path or changes the weights' math.
    """
    unet = build_unet("tiny", 4, 8, 32, seed=0).eval()
    g = torch.Generator().manual_seed(0)
    z, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 6, 32, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    junk = torch.where(mask[..., None], text, 50 * torch.randn(2, 6, 32, generator=g))
    fn, t = unet_model_fn(unet), torch.tensor([10, 500])
    with torch.no_grad():
        sdpa = fn(z, t, text, mask)
        training_attention(unet, "cuda")
        assert torch.equal(fn(z, t, text, mask), sdpa)
        training_attention(unet, "cpu")
        plain, plain_junk = fn(z, t, text, mask), fn(z, t, junk, mask)
    torch.testing.assert_close(plain, sdpa, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(plain_junk, plain, rtol=1e-4, atol=1e-5)


def test_two_training_steps_move_the_weights_and_stay_finite():
    unet = build_unet("tiny", 4, 8, 32, seed=0)
    sched = make_noise_scheduler(DiffusionConfig(prediction_type="v_prediction", zero_terminal_snr=True))
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    before = unet.conv_out.weight.detach().clone()
    for _ in range(2):
        x0, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
        t = torch.tensor([0, 300, 700, 999])  # both ends, zero terminal SNR included
        cond = torch.randn(4, 5, 32, generator=g)
        loss = training_losses(unet_model_fn(unet), x0, t, cond, None, noise, sched, "v_prediction", 5.0, 0.05, g)
        loss.mean().backward()
        # Bug caught: a NaN from SNR 0 reaching the gradients, which AdamW would spread to every weight.
        assert torch.isfinite(loss).all()
        assert all(torch.isfinite(p.grad).all() for p in unet.parameters() if p.grad is not None)
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert not torch.equal(unet.conv_out.weight, before)
