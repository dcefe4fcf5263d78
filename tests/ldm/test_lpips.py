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


def _reference_lpips(vgg_path: str, lin_path: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """LPIPS v0.1 written out from the paper / the `lpips` package's code, in float64, on torchvision's own vgg16.

    Zhang et al. 2018, eq. 1: d(x, y) = sum_l mean_hw || w_l * (f^l_x - f^l_y) ||^2 with f^l unit-normalised
    along channels (eps 1e-10 added to the norm), inputs first scaled by lpips' ScalingLayer.
    """
    net = torchvision.models.vgg16()
    state = torch.load(vgg_path, weights_only=True)
    net.features.load_state_dict({k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")})
    features = net.features.double().eval()
    lin = torch.load(lin_path, weights_only=True)
    shift = torch.tensor([-0.030, -0.088, -0.188], dtype=torch.float64).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450], dtype=torch.float64).view(1, 3, 1, 1)
    taps = {3: 0, 8: 1, 15: 2, 22: 3, 29: 4}  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in torchvision's vgg16
    xa, xb = (a.double() - shift) / scale, (b.double() - shift) / scale
    total = torch.zeros(len(a), dtype=torch.float64)
    for i, layer in enumerate(features[:30]):
        xa, xb = layer(xa), layer(xb)
        if i in taps:
            na = xa / (xa.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            nb = xb / (xb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            w = lin[f"lin{taps[i]}.model.1.weight"].double()  # [1,C,1,1]: the 1x1 conv without bias
            total += (w * (na - nb).pow(2)).sum(1).mean((1, 2))
    return total


def test_distance_equals_an_independent_lpips_computation(weights):
    """Bugs caught: a layer tapped before its ReLU or at the wrong depth, the ScalingLayer's shift/scale swapped or
    missing, normalising over space instead of channels, a linear head applied to the wrong layer (their widths
    differ only at 64/128/256/512, so lin3 and lin4 swapped would pass a shape check), sum instead of spatial mean.
    The test's random weights make every layer's head matter."""
    lp = LPIPS(*weights)
    torch.manual_seed(2)
    a = torch.rand(2, 3, 32, 32) * 2 - 1
    b = (a + 0.3 * torch.randn_like(a)).clamp(-1, 1)
    ours = lp(a, b).double()
    ref = _reference_lpips(*weights, a, b)
    assert ref.min() > 0
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-7)


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


def test_the_lpips_term_changes_training_and_nothing_else_does(weights, tmp_path):
    """Bug caught: train_vae building LPIPS but leaving it out of the loss (or detaching it), so 'l1+lpips+kl'
    trains exactly like 'l1+kl'. Same seed, same data: with linear heads of zeros (LPIPS == 0) the weights after
    two steps equal the plain run's bit for bit, so any difference with real heads comes from the LPIPS gradient."""
    vgg, lin = weights
    zero = tmp_path / "zero.pth"
    torch.save({k: torch.zeros_like(v) for k, v in torch.load(lin, weights_only=True).items()}, zero)
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    base = ["vae.steps=2", "vae.batch_size=2"]

    def trained(*extra: str) -> tuple[dict[str, torch.Tensor], list[float]]:
        vae, hist = train_vae(images, make_config("unused", *base, *extra).vae, 0, progress=False)
        return vae.state_dict(), hist["rec"]

    plain, plain_rec = trained()
    zeroed, zeroed_rec = trained(f"vae.lpips_vgg={vgg}", f"vae.lpips_lin={zero}")
    with_lpips, lpips_rec = trained(f"vae.lpips_vgg={vgg}", f"vae.lpips_lin={lin}")
    assert zeroed_rec == plain_rec
    assert all(torch.equal(zeroed[k], plain[k]) for k in plain)
    assert lpips_rec[0] > plain_rec[0]  # the first step sees the same batch: rec grows by the LPIPS term
    changed = [k for k in plain if not torch.equal(with_lpips[k], plain[k])]
    assert any(k.startswith("encoder.") for k in changed)  # the gradient reached back through the decoder
