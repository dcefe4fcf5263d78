"""Frechet distance between Gaussians fitted to streamed features, and CLIP score.

Written here rather than taken from torchmetrics' FrechetInceptionDistance: that metric owns its
feature module and its running sums, while the sweep needs mean and covariance as plain arrays to
cache the held-out reference once by content hash and to compare any extractor's features.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch


class FeatureStats:
    """Running sums of features in float64: mean and covariance without keeping the features."""

    def __init__(self, dim: int):
        self.n = 0
        self.sum = np.zeros(dim, np.float64)
        self.outer = np.zeros((dim, dim), np.float64)

    def update(self, features: torch.Tensor | np.ndarray) -> None:
        """Add a batch of features [B, D]."""
        x = np.asarray(features.detach().cpu() if isinstance(features, torch.Tensor) else features, np.float64)
        self.n += x.shape[0]
        self.sum += x.sum(axis=0)
        self.outer += x.T @ x

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean [D] and unbiased covariance [D, D] (needs two or more features)."""
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 features, got {self.n}")
        mu = self.sum / self.n
        cov = (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)
        return mu, cov


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:  # fmt: skip
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)), with pytorch-fid's safeguards.

    A singular product (few samples, many dimensions) gives a non-finite sqrtm: retry with eps*I added
    to both covariances. sqrtm of a product of PSD matrices is real up to rounding: drop an imaginary
    part that is tiny, refuse one that is not.
    """
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm has an imaginary component of {np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def clip_score(image_emb: torch.Tensor, text_emb: torch.Tensor) -> float:
    """100 * max(cos(image, text), 0) averaged over pairs (torchmetrics' CLIPScore convention)."""
    cos = torch.nn.functional.cosine_similarity(image_emb.double(), text_emb.double(), dim=-1)
    return float((100 * cos.clamp(min=0)).mean())
