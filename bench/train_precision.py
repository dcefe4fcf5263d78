"""Tiny UNet training step time, fp32 vs bf16 autocast, on this CPU: the figure behind train.mixed_precision=auto."""

from __future__ import annotations

import argparse
import platform
import time

import torch

from ldm.unet.model import build_unet


def step_time(bs: int, bf16: bool, repeats: int) -> float:
    """Median seconds of forward + backward + AdamW step of the tiny UNet on 16x16x4 latents."""
    unet = build_unet("tiny", 4, 16, 128, seed=0)
    opt = torch.optim.AdamW(unet.parameters(), 1e-4)
    x, t, c = torch.randn(bs, 4, 16, 16), torch.randint(0, 1000, (bs,)), torch.randn(bs, 20, 128)
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = unet(x, t, encoder_hidden_states=c).sample
        (out.float() - x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    return sorted(times[1:])[len(times[1:]) // 2]


def main() -> None:
    """Print fp32 and bf16 step times side by side for a few batch sizes."""
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"cpu: {platform.processor() or platform.machine()}, threads {args.threads}")
    for bs in (16, 64):
        fp32, bf16 = step_time(bs, False, args.repeats), step_time(bs, True, args.repeats)
        print(f"batch {bs}: fp32 {fp32:.3f} s, bf16 autocast {bf16:.3f} s, speed-up {fp32 / bf16:.2f}x")


if __name__ == "__main__":
    main()
