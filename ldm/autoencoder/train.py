"""Train the embedded default's KL autoencoder and measure it: PSNR, latent scale factor, a reconstruction grid."""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image
from tqdm import tqdm

from ldm.autoencoder.lpips import LPIPS
from ldm.autoencoder.model import build_vae
from ldm.budget import time_steps
from ldm.config import VaeConfig
from ldm.io import storage

WARMUP_FRACTION = 0.03  # of the steps; Adam at lr 1e-3 on a fresh net is unstable for the first few dozen
MIN_LR_FRACTION = 0.05  # cosine decay floor; most of the final PSNR comes from the low-lr tail


def loss_name(vae_cfg: VaeConfig) -> str:
    """How the loss is reported, e.g. 'l1+kl', 'l1+l2+kl', 'l1+lpips+kl'."""
    terms = ["l1"]
    if vae_cfg.l2_weight:
        terms.append("l2")
    if vae_cfg.edge_weight:
        terms.append("edge")
    if vae_cfg.lpips_vgg and vae_cfg.lpips_weight:
        terms.append("lpips")
    return "+".join([*terms, "kl"])


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N,H,W,3] -> float [N,3,H,W] in [-1, 1], the range SD's VAE works in."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _batches(n: int, batch_size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Index batches over reshuffled epochs, so every image is seen once per epoch (forever)."""
    pool = torch.empty(0, dtype=torch.long)
    while True:
        while len(pool) < batch_size:
            pool = torch.cat([pool, torch.randperm(n, generator=gen)])
        yield pool[:batch_size]
        pool = pool[batch_size:]


def _lr_at(step: int, steps: int, lr: float) -> float:
    """Linear warmup, then cosine decay to MIN_LR_FRACTION of lr."""
    warmup = max(1, int(steps * WARMUP_FRACTION))
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * t)))


def reconstruction_loss(recon: torch.Tensor, x: torch.Tensor, vae_cfg: VaeConfig) -> torch.Tensor:
    """Mean L1, + l2_weight * mean L2, + edge_weight * mean L1 of the error's pixel differences along x and y.

    The edge term is a gradient-difference loss: it ignores an error that is the same over a region and
    charges one that changes across an edge, which is where an L1-trained decoder blurs. On the demo's
    images (3,000 steps, same seconds) weight 1 lifted PSNR 29.1 -> 29.8 dB and the judge's shape
    accuracy on reconstructions 0.73 -> 0.82 (docs/QUALITY.md).
    """
    err = recon - x
    rec = err.abs().mean()
    if vae_cfg.l2_weight:
        rec = rec + vae_cfg.l2_weight * err.pow(2).mean()
    if vae_cfg.edge_weight:
        dx = (err[..., :, 1:] - err[..., :, :-1]).abs().mean()
        dy = (err[..., 1:, :] - err[..., :-1, :]).abs().mean()
        rec = rec + vae_cfg.edge_weight * (dx + dy)
    return rec


def _augment(batch: torch.Tensor, gen: torch.Generator, crop: int | None, flip: bool) -> torch.Tensor:
    """uint8 [B,H,W,3] -> float [B,3,c,c] in [-1, 1]: random crops, random horizontal flips, channels-last."""
    if crop:  # the VAE is convolutional, and a crop costs (crop/res)^2 of a full-size step
        offs = torch.randint(0, batch.shape[1] - crop + 1, (len(batch), 2), generator=gen).tolist()
        batch = torch.stack([img[i : i + crop, j : j + crop] for img, (i, j) in zip(batch, offs, strict=True)])
    x = to_tensor(batch.numpy())
    if flip:  # free extra data for the small embedded-default sets
        mask = torch.rand(len(x), generator=gen) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    return x.contiguous(memory_format=torch.channels_last)  # measured ~10% faster convolutions on CPU


class _Setup:
    """A fresh VAE, its optimizer and everything a step draws from: built the same way for a run and a probe."""

    def __init__(self, images: np.ndarray, vae_cfg: VaeConfig, seed: int, flip: bool):
        if len(images) == 0:
            raise ValueError("no images to train on")
        res = images.shape[1]
        self.cfg, self.flip = vae_cfg, flip
        self.crop = vae_cfg.crop if vae_cfg.crop and vae_cfg.crop < res else None
        self.vae = build_vae(vae_cfg, res, seed).to(memory_format=torch.channels_last).train()
        self.gen = torch.Generator().manual_seed(seed)
        self.data = torch.from_numpy(np.ascontiguousarray(images))  # stays uint8: 4x less memory than float
        self.opt = torch.optim.AdamW(self.vae.parameters(), lr=vae_cfg.lr, weight_decay=0.0)
        self.pixels = 3 * (self.crop or res) ** 2
        use_lpips = vae_cfg.lpips_vgg and vae_cfg.lpips_weight
        self.lpips = LPIPS(vae_cfg.lpips_vgg, vae_cfg.lpips_lin) if use_lpips else None
        self.batches = _batches(len(images), vae_cfg.batch_size, self.gen)

    def step(self, lr: float) -> tuple[float, float, float]:
        """One optimizer step on the next batch at learning rate lr; returns (loss, rec, kl)."""
        vcfg = self.cfg
        x = _augment(self.data[next(self.batches)], self.gen, self.crop, self.flip)
        for group in self.opt.param_groups:
            group["lr"] = lr
        posterior = self.vae.encode(x).latent_dist
        recon = self.vae.decode(posterior.sample(generator=self.gen)).sample
        rec = reconstruction_loss(recon, x, vcfg)
        if self.lpips is not None:
            rec = rec + vcfg.lpips_weight * self.lpips(recon, x).mean()
        kl = posterior.kl().mean()  # summed over latent dims, as LDM logs it
        loss = rec + vcfg.kl_weight * kl / self.pixels
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.item(), rec.item(), kl.item()


def step_seconds(images: np.ndarray, vae_cfg: VaeConfig, seed: int, *, flip: bool = True) -> float:
    """Mean seconds of one training step of this config on these images, timed on a throwaway VAE (the budget)."""
    probe = _Setup(images, vae_cfg, seed, flip)
    return time_steps(lambda: probe.step(vae_cfg.lr))


def train_vae(
    images: np.ndarray,
    vae_cfg: VaeConfig,
    seed: int,
    *,
    flip: bool = True,
    progress: bool = True,
) -> tuple[AutoencoderKL, dict[str, list[float]]]:
    """Train a fresh AutoencoderKL on uint8 [N,H,W,3] images; deterministic for a seed. Returns (vae, history).

    Loss per step, on random vae_cfg.crop-px crops: reconstruction_loss (+ LPIPS) + kl_weight * KL / pixels.
    LDM sums the reconstruction over pixels and adds kl_weight * summed KL; dividing both terms by the
    pixel count keeps that balance (Adam is scale-invariant) while the logged losses stay readable.
    """
    run = _Setup(images, vae_cfg, seed, flip)
    history: dict[str, list[float]] = {"loss": [], "rec": [], "kl": [], "lr": []}
    bar = tqdm(range(vae_cfg.steps), desc="train-vae", unit="step", disable=not progress, dynamic_ncols=True)
    for step in bar:
        lr = _lr_at(step, vae_cfg.steps, vae_cfg.lr)
        loss, rec, kl = run.step(lr)
        for key, value in (("loss", loss), ("rec", rec), ("kl", kl), ("lr", lr)):
            history[key].append(value)
        if step % 10 == 0 or step == vae_cfg.steps - 1:
            bar.set_postfix(rec=f"{rec:.4f}", kl=f"{kl:.0f}")
    vae = run.vae.eval()
    return vae.to(memory_format=torch.contiguous_format), history


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Encode to the posterior mean and decode; returns float [N,H,W,3] in [0, 1]."""
    out = []
    for i in range(0, len(images), batch_size):
        x = to_tensor(images[i : i + batch_size])
        y = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        out.append(((y + 1) / 2).permute(0, 2, 3, 1).numpy())
    return np.concatenate(out) if out else np.zeros((0, *images.shape[1:]), np.float32)


def psnr_per_image(vae: AutoencoderKL, images: np.ndarray) -> np.ndarray:
    """PSNR in dB of each image's reconstruction through the posterior mean, on [0, 1] pixels."""
    recon = reconstruct(vae, images)
    mse = ((recon - images.astype(np.float32) / 255.0) ** 2).reshape(len(images), -1).mean(axis=1)
    return 10.0 * np.log10(1.0 / np.maximum(mse, 1e-10))


def psnr(vae: AutoencoderKL, images: np.ndarray) -> float:
    """Mean per-image PSNR (dB, [0, 1] pixels) reconstructing through the posterior mean (deterministic)."""
    return float(psnr_per_image(vae, images).mean())


@torch.no_grad()
def latent_scale_factor(vae: AutoencoderKL, images: np.ndarray, max_images: int = 512, seed: int = 0) -> float:
    """1/std of sampled latents on up to max_images images: scales latents to unit variance, like SD's 0.18215."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(images), generator=gen)[:max_images].sort().values.numpy()
    latents = [
        vae.encode(to_tensor(images[idx[i : i + 64]])).latent_dist.sample(generator=gen) for i in range(0, len(idx), 64)
    ]
    return float(1.0 / torch.cat(latents).flatten().std())


def reconstruction_grid(vae: AutoencoderKL, images: np.ndarray, path: str | Path, n: int = 8) -> None:
    """Write a PNG (local path or URL): n originals in the top row, their reconstructions below."""
    originals = images[:n]
    recon = (reconstruct(vae, originals) * 255.0).round().astype(np.uint8)
    grid = np.concatenate([np.concatenate(list(originals), axis=1), np.concatenate(list(recon), axis=1)], axis=0)
    img = Image.fromarray(grid)
    scale = max(1, 128 // images.shape[1])  # tiny test-profile images are unreadable at 1:1
    img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    storage.write_bytes_atomic(storage.normalize(str(path)), buf.getvalue())
