"""One-core VAE encode speed by memory layout, chunk size and precision: why the precompute actors run as they do.

Encodes the same random 64 px pixels with the trained local VAE on one torch thread, posterior mean only,
for each variant; variants alternate across repeats and medians are printed. bf16 runs under CPU autocast
(fast only where the CPU has AMX). Needs a work directory where train-vae ran (e.g. after `make demo`):

    .venv/bin/python bench/vae_encode.py --workdir work/local [--images 512] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ldm.autoencoder.model import load_vae
from ldm.config import load_config
from ldm.devices import has_amx, native_bf16

VARIANTS = [  # (label, channels_last, chunk, bf16)
    ("fp32 contiguous, batches of 64", False, 64, False),
    ("fp32 channels-last, chunks of 16", True, 16, False),
    ("bf16 channels-last, chunks of 16", True, 16, True),
]


def main() -> None:
    """Print images/s per variant (one thread) and the latents' bf16 error."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="work/local")
    p.add_argument("--profile", default="local")
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(a.profile, [], a.workdir)
    vae = load_vae(cfg).eval()
    res = cfg.ingest.resolution
    x = torch.rand(a.images, 3, res, res, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def encode(channels_last: bool, chunk: int, bf16: bool) -> torch.Tensor:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        v, xs = vae.to(memory_format=fmt), x.contiguous(memory_format=fmt)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return torch.cat([v.encode(part).latent_dist.mean.float() for part in xs.split(chunk)])

    rates: dict[str, list[float]] = {label: [] for label, *_ in VARIANTS}
    for r in range(a.repeats + 1):  # the first round warms up
        for label, *args in VARIANTS if r % 2 else VARIANTS[::-1]:
            t = time.perf_counter()
            encode(*args)
            if r:
                rates[label].append(a.images / (time.perf_counter() - t))
    amx, bf16 = ("yes" if f() else "no" for f in (has_amx, native_bf16))
    print(f"\n{a.images} images at {res} px, 1 thread, AMX {amx}, bf16 encode {bf16} (images/s)")
    for label, xs in rates.items():
        print(f"  {label:<34} median {statistics.median(xs):6.1f}   runs {', '.join(f'{v:.0f}' for v in xs)}")
    ref, low = encode(True, 16, False), encode(True, 16, True)
    print(f"  bf16 latents: relative RMS error {float((ref - low).pow(2).mean().sqrt() / ref.std()):.4f} of their std")


if __name__ == "__main__":
    main()
