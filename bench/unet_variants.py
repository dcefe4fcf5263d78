"""The tiny UNet's training step against variants of it and micro, side by side, in the train stage's shape.

One Ray worker of the demo: 1 thread, micro-batch 32, 16x16x4 latents, text states [20, 128], bf16
autocast, plain attention, as the training loop runs it. Alternating repeats,
medians, and the ratio tiny / variant (> 1: the variant is faster). The harness in bench/shape_sweep
times one process of 2 threads instead, which flatters some variants (docs/QUALITY.md).

    PYTHONPATH=. .venv/bin/python bench/unet_variants.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from _common import cpu_name, median_step_s

from ldm.unet.model import UNET_SIZES, build_unet, training_attention

VARIANTS = {
    "tiny": {},
    "no middle block": {"mid_block_type": None},
    "micro": UNET_SIZES["micro"],  # the local profile's size: every width halved
}


def step_fn(extra: dict):
    """One bf16 training step of the tiny UNet with `extra` config changes, as a closure."""
    UNET_SIZES["_bench"] = {**UNET_SIZES["tiny"], **extra}
    try:
        unet = build_unet("_bench", 4, 16, 128, seed=0)
    finally:
        del UNET_SIZES["_bench"]
    training_attention(unet, "cpu")
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x, cond = torch.randn(32, 4, 16, 16, generator=g), torch.randn(32, 20, 128, generator=g)
    t = torch.randint(0, 1000, (32,), generator=g)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = unet(x, t, cond).sample.float().pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=11, help="timed steps per repeat (after 3 left out)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"cpu: {cpu_name()}, 1 thread, batch 32, bf16, plain attention")
    steps = {name: step_fn(extra) for name, extra in VARIANTS.items()}
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.repeats):
        for name, step in steps.items():
            times[name].append(median_step_s(step, args.steps, warmup=3))
    base = statistics.median(times["tiny"])
    for name, xs in times.items():
        med = statistics.median(xs)
        runs = ", ".join(f"{x:.3f}" for x in xs)
        print(f"  {name:<16} median {med:.3f} s/step   runs {runs}   tiny / this {base / med:.2f}x")


if __name__ == "__main__":
    main()
