"""A CPU UNet's training step time on this CPU: fp32 vs bf16 autocast, torch's SDPA vs diffusers' plain
attention. The figures behind train.mixed_precision=auto and `ldm.unet.model.training_attention`.
`--size micro` for the local profile's UNet (default: tiny).

The demo trains with 2 Ray workers of 1 thread each (micro-batch 32), so that shape is measured too.
--layouts also times that shape's bf16 plain step channels-last and under torch.compile (with its
compile seconds): the options left out of the demo.
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import cpu_name, median_step_s

from ldm.unet.model import build_unet, training_attention


def step_time(
    bs: int,
    bf16: bool,
    plain_attention: bool,
    repeats: int,
    channels_last: bool = False,
    compiled: bool = False,
    size: str = "tiny",
) -> float:
    """Median seconds of forward + backward + AdamW step of a UNet size on 16x16x4 latents."""
    unet = build_unet(size, 4, 16, 128, seed=0)
    if plain_attention:
        training_attention(unet, "cpu")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    unet = unet.to(memory_format=fmt)
    model = torch.compile(unet) if compiled else unet
    opt = torch.optim.AdamW(unet.parameters(), 1e-4)
    x, t, c = torch.randn(bs, 4, 16, 16).to(memory_format=fmt), torch.randint(0, 1000, (bs,)), torch.randn(bs, 20, 128)
    mask = torch.ones(bs, 20, dtype=torch.bool)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x, t, encoder_hidden_states=c, encoder_attention_mask=mask).sample
        (out.float() - x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()

    return median_step_s(step, repeats)


def main() -> None:
    """Print the four step times side by side for each (threads, batch) shape, with the ratios."""
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--layouts", action="store_true", help="only: bf16 plain eager vs channels-last vs compiled")
    p.add_argument("--size", default="tiny", help="a CPU size of ldm.unet.UNET_SIZES")
    args = p.parse_args()
    print(f"cpu: {cpu_name()}, {args.size} UNet")
    if args.layouts:
        torch.set_num_threads(1)
        eager = step_time(32, True, True, args.repeats, size=args.size)
        last = step_time(32, True, True, args.repeats, channels_last=True, size=args.size)
        t0 = time.perf_counter()
        compiled = step_time(32, True, True, args.repeats, compiled=True, size=args.size)
        spent = time.perf_counter() - t0 - (args.repeats + 2) * compiled
        print(
            f"1 thread, batch 32, bf16 plain: eager {eager:.3f} s, channels-last {last:.3f} s "
            f"({eager / last:.2f}x), compiled {compiled:.3f} s ({eager / compiled:.2f}x; compiling ~{spent:.0f} s)"
        )
        return
    for threads, bs in ((1, 32), (2, 64)):
        torch.set_num_threads(threads)
        kinds = [(bf16, plain) for bf16 in (False, True) for plain in (False, True)]
        t = {k: step_time(bs, *k, args.repeats, size=args.size) for k in kinds}
        print(
            f"{threads} thread(s), batch {bs}: fp32 sdpa {t[False, False]:.3f} s, fp32 plain {t[False, True]:.3f} s, "
            f"bf16 sdpa {t[True, False]:.3f} s, bf16 plain {t[True, True]:.3f} s; "
            f"bf16 plain vs bf16 sdpa {t[True, False] / t[True, True]:.2f}x, "
            f"vs fp32 sdpa {t[False, False] / t[True, True]:.2f}x"
        )


if __name__ == "__main__":
    main()
