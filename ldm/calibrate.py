"""The budget's calibration step: one tiny-UNet training step's median seconds on this CPU, printed.

`python -m ldm.calibrate [auto|bf16|fp32]`; run by ldm/budget.py in a process of its own.
"""

from __future__ import annotations

import sys
import time

import torch

from ldm.devices import autocast_dtype
from ldm.unet.model import build_unet, training_attention

STEPS = 14  # the first three are left out (allocation, oneDNN's kernel choice); ~8 s on a slow CPU


def calibration_step_s(mixed_precision: str = "auto", steps: int = STEPS) -> float:
    """Median seconds of one tiny-UNet training step on this CPU: 1 thread, batch 32, 16x16x4 latents.

    The shape of one of the demo's two Ray Train workers (bench/train_precision.py), in the precision
    the train stage would pick, with plain attention as the training loop uses.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        unet = build_unet("tiny", 4, 16, 128, seed=0)
        training_attention(unet, "cpu")
        opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
        g = torch.Generator().manual_seed(0)
        x, cond = torch.randn(32, 4, 16, 16, generator=g), torch.randn(32, 20, 128, generator=g)
        t = torch.randint(0, 1000, (32,), generator=g)
        dtype = autocast_dtype(mixed_precision, "cpu")
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                loss = unet(x, t, cond).sample.float().pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    kept = sorted(times[3:])  # a median: this CPU's steps vary by 10-20% from one second to the next
    return kept[len(kept) // 2]


if __name__ == "__main__":
    print(f"{calibration_step_s(sys.argv[1] if len(sys.argv) > 1 else 'auto'):.4f}")
