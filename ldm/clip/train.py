"""Contrastive training of the tiny CLIP with open_clip's ClipLoss, and the retrieval metric that judges it."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from open_clip.model import CLIP
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

from ldm.clip.encoder import ClipEncoder, to_model_input
from ldm.clip.model import build_model, build_tokenizer, tiny_model_config
from ldm.config import ClipConfig
from ldm.devices import native_bf16

WARMUP_FRACTION = 0.1  # from-scratch contrastive training collapses (loss stuck at log B) without it
WEIGHT_DECAY = 0.1
MAX_LOGIT_SCALE = math.log(100)  # CLIP's clamp on the learned temperature
MAX_SHIFT = 0.06  # random translation, as a fraction of the image side


def init_model(clip_cfg: ClipConfig, image_size: int, seed: int) -> CLIP:
    """The tiny model's initial weights for a seed (also the 'untrained' baseline the stage reports)."""
    torch.manual_seed(seed)
    return build_model(tiny_model_config(clip_cfg, image_size))


def _param_groups(model: CLIP) -> list[dict]:
    """Decay matrices only: biases, norms, embeddings and the temperature train freely (as open_clip does)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        skip = p.ndim < 2 or "embedding" in name or name == "logit_scale"
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]


def _lr_at(step: int, total: int, base: float) -> float:
    """Linear warm-up, then cosine decay to zero."""
    warmup = max(1, int(total * WARMUP_FRACTION))
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Small random translations with edge padding.

    No flips or crops: captions name positions ("on the left", "above"), which those would falsify.
    """
    n, _, h, w = x.shape
    pad = max(1, round(MAX_SHIFT * h))
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="replicate")
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None].expand(n, x.shape[1], h, w + 2 * pad)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :].expand(n, x.shape[1], h, w)
    return out.gather(3, cols)


def train_clip(
    images: np.ndarray,
    captions: Sequence[str],
    clip_cfg: ClipConfig,
    seed: int,
    on_epoch: Callable[[int, float], None] | None = None,
) -> CLIP:
    """Train the tiny CLIP from scratch on uint8 [N,H,W,3] images and captions; deterministic for a seed.

    on_epoch(epoch, mean_loss) is called after every epoch (the stage logs it to MLflow).
    """
    if len(images) < 2:
        raise ValueError(f"need at least 2 image-caption pairs to train CLIP, got {len(images)}")
    image_size = int(images.shape[1])
    model = init_model(clip_cfg, image_size, seed).train()
    gen = torch.Generator().manual_seed(seed)
    # Preprocess and tokenize once: the whole set fits in memory and epochs only reorder it.
    pixels = to_model_input(images, image_size)
    tokens = build_tokenizer(clip_cfg.context_length)(list(captions))
    batch = min(clip_cfg.batch_size, len(images))
    steps_per_epoch = len(images) // batch  # drop the ragged last batch: tiny batches make noisy contrastive steps
    total = steps_per_epoch * clip_cfg.epochs
    # fused: one kernel over all parameters; the unfused loop costs as much as the text tower on CPU.
    opt = torch.optim.AdamW(_param_groups(model), lr=clip_cfg.lr, betas=(0.9, 0.98), eps=1e-6, fused=True)
    loss_fn = ClipLoss()
    bf16 = native_bf16()
    step = 0
    bar = tqdm(total=total, desc="train-clip", unit="step", dynamic_ncols=True, leave=False)
    for epoch in range(clip_cfg.epochs):
        order = torch.randperm(len(images), generator=gen)
        losses = []
        for b in range(steps_per_epoch):
            idx = order[b * batch : (b + 1) * batch]
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, total, clip_cfg.lr)
            # The math attention kernel: CPU flash attention's backward is slow at these tiny head counts,
            # and many times slower under bf16. The loss itself is computed in fp32.
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), sdpa_kernel(SDPBackend.MATH):
                img_f = model.encode_image(_augment(pixels[idx], gen))
                txt_f = model.encode_text(tokens[idx])
            img_f, txt_f = F.normalize(img_f.float(), dim=-1), F.normalize(txt_f.float(), dim=-1)
            loss = loss_fn(img_f, txt_f, model.logit_scale.exp())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
            losses.append(loss.item())
            step += 1
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
        if on_epoch is not None:
            on_epoch(epoch, float(np.mean(losses)))
    bar.close()
    return model.eval()


def retrieval_predictions(encoder: ClipEncoder, images: np.ndarray, captions: Sequence[str], candidates: int = 100):
    """For each image in the full groups of `candidates`, the index of the caption it retrieves from its group."""
    n = (len(images) // candidates) * candidates
    if n == 0:
        raise ValueError(f"retrieval among {candidates} needs at least {candidates} samples, got {len(images)}")
    img = encoder.encode_images(images[:n])
    txt = encoder.encode_text(list(captions[:n]))
    picks = []
    for g in range(0, n, candidates):
        sims = img[g : g + candidates] @ txt[g : g + candidates].T
        picks.append(sims.argmax(dim=1) + g)
    return torch.cat(picks).numpy()


def retrieval_top1(encoder: ClipEncoder, images: np.ndarray, captions: Sequence[str], candidates: int = 100) -> float:
    """Image-to-text top-1 accuracy, each image choosing among its group of `candidates` captions.

    Groups are consecutive runs of `candidates` samples (a ragged tail is dropped so chance is
    always 1/candidates); picking a caption string identical to the true one counts as correct.
    """
    picks = retrieval_predictions(encoder, images, captions, candidates)
    return float(np.mean([captions[p] == captions[i] for i, p in enumerate(picks)]))
