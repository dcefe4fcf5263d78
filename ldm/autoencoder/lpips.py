"""LPIPS (Zhang et al. 2018, v0.1 with VGG16) from local weight files, for the autoencoder's perceptual loss.

Two public files, never downloaded here: torchvision's VGG16 checkpoint (`vgg16-397923af.pth`, keys
`features.N.*`; the classifier is ignored) and the `lpips` package's linear heads (`weights/v0.1/vgg.pth`,
keys `linK.model.1.weight`). LDM's autoencoder configs add LPIPS with weight 1.0 to L1 + KL.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ldm.io.manifest import StageError

VGG_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
VGG_CHANNELS = (64, 128, 256, 512, 512)
SHIFT = (-0.030, -0.088, -0.188)  # lpips' ScalingLayer: inputs in [-1, 1] to ImageNet statistics
SCALE = (0.458, 0.448, 0.450)


def _vgg16_features() -> nn.Sequential:
    """torchvision's vgg16().features layout (conv3x3 + ReLU, max-pools), up to relu5_3."""
    layers: list[nn.Module] = []
    cin = 3
    for block, (cout, convs) in enumerate(zip((64, 128, 256, 512, 512), (2, 2, 3, 3, 3), strict=True)):
        if block:
            layers.append(nn.MaxPool2d(2, 2))
        for _ in range(convs):
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=False)]
            cin = cout
    return nn.Sequential(*layers)


def _load(path: str, what: str) -> dict[str, torch.Tensor]:
    p = Path(path)
    if not p.is_file():
        raise StageError(f"LPIPS {what} weights {path} do not exist")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same one-line error
        raise StageError(f"LPIPS {what} weights {path} are not a readable torch checkpoint: {e}") from e


def _check_keys(path: str, got: set[str], want: set[str]) -> None:
    missing, unexpected = sorted(want - got), sorted(got - want)
    if missing or unexpected:
        raise StageError(f"{path} does not match LPIPS: missing keys {missing[:4]}, unexpected keys {unexpected[:4]}")


class LPIPS(nn.Module):
    """Perceptual distance per image between two batches in [-1, 1], [B,3,H,W] -> [B]. Frozen."""

    def __init__(self, vgg_path: str, lin_path: str):
        super().__init__()
        self.features = _vgg16_features()
        vgg = {k.removeprefix("features."): v for k, v in _load(vgg_path, "VGG16").items() if k.startswith("features.")}
        want = set(self.features.state_dict())
        _check_keys(vgg_path, set(vgg), want)
        self.features.load_state_dict({k: vgg[k] for k in want})
        lin = _load(lin_path, "linear-head")
        lin_want = {f"lin{i}.model.1.weight" for i in range(len(VGG_CHANNELS))}
        _check_keys(lin_path, set(lin), lin_want)
        for i, c in enumerate(VGG_CHANNELS):
            if tuple(lin[f"lin{i}.model.1.weight"].shape) != (1, c, 1, 1):
                raise StageError(f"{lin_path}: lin{i} has shape {tuple(lin[f'lin{i}.model.1.weight'].shape)}")
        self.register_buffer("lin", torch.cat([lin[f"lin{i}.model.1.weight"].flatten() for i in range(5)]))
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1))
        self.requires_grad_(False).eval()

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        x = (torch.cat([a, b]) - self.shift) / self.scale
        total = a.new_zeros(len(a))
        offset = 0
        for (lo, hi), c in zip(VGG_SLICES, VGG_CHANNELS, strict=True):
            x = self.features[lo:hi](x)
            f = x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)  # unit length along channels
            fa, fb = f.chunk(2)
            w = self.lin[offset : offset + c].view(1, c, 1, 1)
            total = total + ((fa - fb).pow(2) * w).sum(1).mean((1, 2))
            offset += c
        return total
