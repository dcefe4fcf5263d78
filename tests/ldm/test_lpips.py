"""LPIPS for the autoencoder loss: loads the public file layouts, measures what it should, fails in one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

from ldm.autoencoder.lpips import LPIPS, VGG_CHANNELS, _vgg16_features
from ldm.autoencoder.train import loss_name, train_vae
from ldm.io.manifest import StageError
from tests.helpers import make_config


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> tuple[str, str]:
    """A torchvision-layout VGG16 checkpoint (features only, random) and lpips-layout linear heads."""
    d = tmp_path_factory.mktemp("lpips")
    torch.manual_seed(0)
    vgg = {f"features.{k}": v for k, v in _vgg16_features().state_dict().items()}
    vgg["classifier.0.weight"] = torch.zeros(2, 2)  # a full torchvision checkpoint also has the classifier
    lin = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(VGG_CHANNELS)}
    torch.save(vgg, d / "vgg16.pth")
    torch.save(lin, d / "vgg.pth")
    return str(d / "vgg16.pth"), str(d / "vgg.pth")


def test_features_match_torchvision_vgg16_layout():
    ours = {k: v.shape for k, v in _vgg16_features().state_dict().items()}
    theirs = {k: v.shape for k, v in torchvision.models.vgg16().features.state_dict().items()}
    assert ours == theirs


def test_distance_is_zero_for_same_images_and_grows_with_distortion(weights):
    lp = LPIPS(*weights)
    torch.manual_seed(1)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    same = lp(x, x)
    small = lp(x, (x + 0.05 * torch.randn_like(x)).clamp(-1, 1))
    large = lp(x, (x + 0.5 * torch.randn_like(x)).clamp(-1, 1))
    assert same.shape == (3,) and torch.allclose(same, torch.zeros(3))
    assert (small > 0).all() and (large > small).all()
    y = x.clone().requires_grad_(True)
    lp(y, x.flip(3)).sum().backward()  # the loss reaches the reconstruction, not the frozen network
    assert y.grad is not None and y.grad.abs().sum() > 0
    assert all(p.grad is None for p in lp.parameters())


def test_missing_or_wrong_weights_are_one_line_errors(weights, tmp_path):
    vgg, lin = weights
    with pytest.raises(StageError, match="nope.pth do not exist"):
        LPIPS(str(tmp_path / "nope.pth"), lin)
    bad = tmp_path / "bad.pth"
    torch.save({"lin0.model.1.weight": torch.rand(1, 64, 1, 1)}, bad)
    with pytest.raises(StageError, match=r"bad.pth does not match LPIPS: missing keys \['lin1") as e:
        LPIPS(vgg, str(bad))
    assert "\n" not in str(e.value)


def test_train_vae_uses_lpips_when_configured(weights):
    vgg, lin = weights
    cfg = make_config("unused", "vae.steps=3", "vae.batch_size=2", f"vae.lpips_vgg={vgg}", f"vae.lpips_lin={lin}")
    assert loss_name(cfg.vae) == "l1+lpips+kl"
    assert loss_name(make_config("unused").vae) == "l1+kl"
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    _, hist = train_vae(images, cfg.vae, 0, progress=False)
    assert len(hist["rec"]) == 3 and all(np.isfinite(hist["rec"]))
    with pytest.raises(ValueError, match="both lpips_vgg and lpips_lin"):
        make_config("unused", f"vae.lpips_vgg={vgg}")
