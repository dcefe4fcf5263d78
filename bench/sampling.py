"""Guided sampling images/s, ours vs diffusers' own denoising loop, and peak memory of a streamed FD computation.

Both loops run the same tiny UNet, DDIM scheduler, steps, guidance and seed, alternated, on this CPU;
the FD part runs each sample count in a fresh process (peak RSS is per process).
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time

import torch
from _common import cpu_name


def diffusers_loop(unet, sched, cond, uncond, steps: int, scale: float, seed: int, shape) -> torch.Tensor:
    """The denoising loop of diffusers' StableDiffusionPipeline.__call__, written out."""
    from diffusers.utils.torch_utils import randn_tensor

    sched.set_timesteps(steps)
    latents = randn_tensor((cond.shape[0], *shape), generator=torch.Generator().manual_seed(seed))
    latents = latents * sched.init_noise_sigma
    context = torch.cat([uncond.expand(cond.shape[0], -1, -1), cond])
    for t in sched.timesteps:
        x = sched.scale_model_input(torch.cat([latents] * 2), t)
        eps_u, eps_c = unet(x, t, encoder_hidden_states=context).sample.chunk(2)
        latents = sched.step(eps_u + scale * (eps_c - eps_u), t, latents).prev_sample
    return latents


@torch.no_grad()
def throughput(batch: int, steps: int, repeats: int) -> tuple[float, float, float]:
    """Median images/s of ours and of the diffusers loop, and the largest latent difference between them."""
    from diffusers import DDIMScheduler

    from ldm.config import DiffusionConfig
    from ldm.diffusion.guidance import make_sampler, sample
    from ldm.diffusion.schedule import make_noise_scheduler
    from ldm.unet.model import build_unet

    unet = build_unet("tiny", 4, 16, 128, seed=0).eval()
    train_cfg = make_noise_scheduler(DiffusionConfig()).config
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(batch, 20, 128, generator=g), torch.randn(1, 20, 128, generator=g)
    ours_s, theirs_s, diff = [], [], 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        a = sample(unet, make_sampler("ddim", train_cfg), cond, None, uncond, None, steps, 4.0,
                   torch.Generator().manual_seed(1), (4, 16, 16))  # fmt: skip
        ours_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        b = diffusers_loop(unet, DDIMScheduler.from_config(train_cfg, timestep_spacing="trailing"), cond, uncond,
                           steps, 4.0, 1, (4, 16, 16))  # fmt: skip
        theirs_s.append(time.perf_counter() - t0)
        diff = max(diff, float((a - b).abs().max()))
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return batch / med(ours_s), batch / med(theirs_s), diff


def fd_peak(n: int, batch: int) -> None:
    """Child process: features of n rendered held-out images (tiny CLIP, random weights), streamed into FD."""
    import numpy as np

    from ldm.clip.encoder import ClipEncoder
    from ldm.clip.model import build_model, tiny_model_config
    from ldm.config import ClipConfig
    from ldm.io.shards import decode_rgb
    from ldm.metrics.frechet import FeatureStats, frechet_distance
    from ldm.synthetic import HELDOUT_START, describe, render

    enc = ClipEncoder(build_model(tiny_model_config(ClipConfig(), 64)))
    stats = FeatureStats(enc.embed_dim)
    for i in range(0, n, batch):
        imgs = np.stack(
            [decode_rgb(render(describe(0, HELDOUT_START + j, 96), 0), 64) for j in range(i, min(n, i + batch))]
        )
        stats.update(enc.encode_images(imgs))
    mu, sigma = stats.mean_cov()
    fd = frechet_distance(mu, sigma, mu + 0.1, sigma)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{n} {peak_mib:.1f} {fd:.4f}")


def main() -> None:
    """Print the images/s ratio and the FD peak memory at each sample count."""
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--fd-samples", type=int, nargs="*", default=[1000, 4000])
    p.add_argument("--fd-child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.fd_child is not None:
        fd_peak(args.fd_child, 64)
        return
    print(f"cpu: {cpu_name()}, threads {args.threads}")
    ours, theirs, diff = throughput(args.batch, args.steps, args.repeats)
    print(f"guided DDIM, tiny UNet 16x16x4, batch {args.batch}, {args.steps} steps, guidance 4:")
    print(f"  ours {ours:.1f} images/s, diffusers loop {theirs:.1f} images/s, ratio {ours / theirs:.2f}x")
    print(f"  max |latent difference| {diff:.1e}")
    for n in args.fd_samples:
        cmd = [sys.executable, __file__, "--threads", str(args.threads), "--fd-child", str(n)]
        n_, peak, _ = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split()
        print(f"FD over {n_} samples (64 px renders, tiny CLIP features, batches of 64): peak RSS {peak} MiB")


if __name__ == "__main__":
    main()
