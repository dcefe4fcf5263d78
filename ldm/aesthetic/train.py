"""Fit the aesthetic MLP to ratings (MSE, as LAION did) and measure it by rank correlation."""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import nn
from tqdm import tqdm

from ldm.aesthetic.model import AestheticMLP
from ldm.config import AestheticConfig


def train_aesthetic(embeddings: torch.Tensor, ratings: torch.Tensor, cfg: AestheticConfig, seed: int) -> AestheticMLP:
    """Train the MLP on L2-normalised embeddings [N, D] against ratings [N] with MSE."""
    torch.manual_seed(seed)
    model = AestheticMLP(embeddings.shape[1])
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    loss_fn = nn.MSELoss()
    gen = torch.Generator().manual_seed(seed)
    n = len(ratings)
    model.train()
    for _ in tqdm(range(cfg.epochs), desc="train-aesthetic", unit="epoch", leave=False):
        for idx in torch.randperm(n, generator=gen).split(cfg.batch_size):
            opt.zero_grad()
            loss = loss_fn(model(embeddings[idx]), ratings[idx])
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def predict(model: AestheticMLP, embeddings: torch.Tensor) -> np.ndarray:
    """Scores for embeddings, in eval mode (no dropout)."""
    model.eval()
    return model(embeddings).numpy()


def spearman(pred: np.ndarray, true: np.ndarray) -> float:
    """Spearman rank correlation (0 for a constant prediction)."""
    if np.ptp(pred) == 0:
        return 0.0
    return float(spearmanr(pred, true).statistic)
