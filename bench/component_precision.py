"""Training step time of the embedded default's tiny CLIP and VAE on this CPU, fp32 vs bf16 autocast.

The figures behind `ldm.devices.native_bf16` for train-clip (bf16 where the CPU has AMX or
AVX512-BF16) and behind train-vae staying fp32. Random inputs of the demo's shapes: 64 px images
and 32-token captions for the CLIP (batch 64), the VAE's 32 px training crops (batch 16 and 32).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _common import cpu_name, median_step_s
from open_clip.loss import ClipLoss
from torch.nn.attention import SDPBackend, sdpa_kernel

from ldm.autoencoder.model import build_vae
from ldm.clip.train import init_model
from ldm.config import ClipConfig, VaeConfig
from ldm.devices import has_amx, has_avx512_bf16


def clip_step(bf16: bool) -> Callable[[], None]:
    """One train-clip step (image and text towers, contrastive loss in fp32, fused AdamW)."""
    model = init_model(ClipConfig(), 64, 0).train()
    opt = torch.optim.AdamW(model.parameters(), 1e-3, fused=True)
    x, tokens, loss_fn = torch.randn(64, 3, 64, 64), torch.randint(1, 400, (64, 32)), ClipLoss()

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), sdpa_kernel(SDPBackend.MATH):
            img, txt = model.encode_image(x), model.encode_text(tokens)
        img, txt = F.normalize(img.float(), dim=-1), F.normalize(txt.float(), dim=-1)
        loss = loss_fn(img, txt, model.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def vae_step(bf16: bool, batch: int) -> Callable[[], None]:
    """One train-vae step on 32 px crops (L1 + KL), channels-last as train_vae runs it."""
    vae = build_vae(VaeConfig(), 64, 0).to(memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(vae.parameters(), 1e-3)
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample()).sample
        loss = (recon.float() - x).abs().mean() + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main() -> None:
    """Print fp32 and bf16 step times side by side with their ratio."""
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=9)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"cpu: {cpu_name()}, AMX {has_amx()}, AVX512-BF16 {has_avx512_bf16()}, threads {args.threads}")
    for name, make in (
        ("clip, batch 64", clip_step),
        ("vae, batch 16", lambda bf16: vae_step(bf16, 16)),
        ("vae, batch 32", lambda bf16: vae_step(bf16, 32)),
    ):
        fp32, bf16 = median_step_s(make(False), args.repeats), median_step_s(make(True), args.repeats)
        print(f"{name}: fp32 {fp32:.4f} s, bf16 autocast {bf16:.4f} s, bf16 speed-up {fp32 / bf16:.2f}x")


if __name__ == "__main__":
    main()
