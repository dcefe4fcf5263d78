"""UNet training throughput on one GPU: images/s and model FLOPs utilisation of the `sd2-base` UNet at 256 px.

The SD 2 base UNet (865.9M parameters, `build_unet("sd2-base", 4, 32, 1024)`) on random 32x32x4 latents
(256 px images through an f=8 VAE) and random 77 x 1024 text states with their attention mask, as the
train loop feeds it; the loop's objective (`training_losses`: epsilon target, min-SNR-5 weights, SD's
scaled-linear schedule), bf16 autocast, AdamW, no gradient checkpointing, one GPU, no data loading.
Warm-up steps, then --repeats windows of --steps steps between CUDA synchronizations; medians.

MFU = (3 x forward FLOPs per step) / step time / the device's peak dense bf16 FLOP/s. The forward
FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` on one forward (matmuls, convolutions,
attention); x3 counts the backward as twice the forward. Peaks: H100 SXM and H200 989 TFLOP/s,
NVL parts 835, H100 PCIe 756, A100 312 (vendor datasheets, dense); --peak-tflops for any other device.

Anchor: MosaicML trained SD 2 base at 256 px at 137 images/s per A100 (their SD2-base-for-under-$50k
run); goal here >= 45% MFU. Runs in about 2 minutes on an H100 or H200 (most of it building the model):

    python bench/gpu_train.py [--batch 64] [--steps 20] [--repeats 3] [--compile [--compile-mode max-autotune]]
        [--channels-last] [--fused-adam] [--peak-tflops 989]

Smoke run on a CPU (tiny UNet, meaningless figures): python bench/gpu_train.py --cpu
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from types import SimpleNamespace

import torch

from ldm.diffusion.guidance import unet_model_fn
from ldm.diffusion.objective import training_losses
from ldm.diffusion.schedule import make_noise_scheduler
from ldm.unet.model import build_unet

# Dense bf16 TFLOP/s by device name (vendor datasheets); the first match wins, so the NVL and PCIe parts come first.
PEAK_BF16_TFLOPS = (
    ("H200 NVL", 835.0), ("H200", 989.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0),
)  # fmt: skip
MOSAIC_A100_IMAGES_S = 137.0


def peak_tflops(device_name: str) -> float | None:
    """Dense bf16 peak of a known device, from its name; None if unknown."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in device_name:
            return tflops
    return None


def make_step(unet, opt, device: str, amp: bool):
    """One training step (forward, backward, AdamW) on a batch; returns nothing, leaves work queued."""
    fn = unet_model_fn(unet)
    # The loop's defaults (DiffusionConfig): SD's scaled-linear schedule over 1000 steps, epsilon target.
    sched = make_noise_scheduler(
        SimpleNamespace(schedule="scaled_linear", timesteps=1000, prediction_type="epsilon", zero_terminal_snr=False)
    )
    alphas = sched.alphas_cumprod.to(device)

    def step(x0, text, mask) -> None:
        t = torch.randint(0, 1000, (x0.shape[0],), device=device)
        noise = torch.randn_like(x0)
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
            loss = training_losses(fn, x0, t, text, mask, noise, alphas, "epsilon", 5.0).mean()
        loss.backward()
        opt.step()

    return step


def forward_flops(unet, x0, text, mask, device: str, amp: bool) -> int:
    """FLOPs of one forward pass at this batch, as torch's FLOP counter counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    t = torch.randint(0, 1000, (x0.shape[0],), device=device)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter, torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
        unet(x0, t, encoder_hidden_states=text, encoder_attention_mask=mask)
    return counter.get_total_flops()


def measure(a, device: str, batch: int) -> dict:
    """Build the UNet, count its FLOPs, warm up and time; figures of one batch size."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    unet = build_unet(a.size, 4, a.latent, a.text_dim, seed=0).to(device)
    if a.grad_checkpointing:
        unet.enable_gradient_checkpointing()
    params = sum(p.numel() for p in unet.parameters())
    if a.channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    # fused: one kernel for every parameter's update instead of a loop of small ones (CUDA and CPU builds have it)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, weight_decay=0.01, fused=a.fused_adam or None)
    g = torch.Generator(device=device).manual_seed(0)
    x0 = torch.randn(batch, 4, a.latent, a.latent, device=device, generator=g)
    if a.channels_last:
        x0 = x0.contiguous(memory_format=torch.channels_last)
    text = torch.randn(batch, a.text_len, a.text_dim, device=device, generator=g)
    mask = None if a.no_mask else torch.ones(batch, a.text_len, dtype=torch.bool, device=device)
    amp = not a.fp32
    flops = forward_flops(unet, x0, text, mask, device, amp)
    model = torch.compile(unet, mode=a.compile_mode) if a.compile else unet
    step = make_step(model, opt, device, amp)
    t0 = time.perf_counter()
    for _ in range(a.warmup):
        step(x0, text, mask)
    sync()
    warm_s = time.perf_counter() - t0
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step_s = []
    for _ in range(a.repeats):
        sync()
        t0 = time.perf_counter()
        for _ in range(a.steps):
            step(x0, text, mask)
        sync()
        step_s.append((time.perf_counter() - t0) / a.steps)
    peak_gb = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return {"params": params, "flops": flops, "step_s": step_s, "warm_s": warm_s, "peak_gb": peak_gb}


def main() -> None:
    """Print images/s and MFU of the UNet's training step."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64, help="images per step (halved until it fits on an OOM)")
    p.add_argument("--size", default="sd2-base", help="UNet size (ldm.unet.model.UNET_SIZES)")
    p.add_argument("--latent", type=int, default=32, help="latent side (256 px / 8)")
    p.add_argument("--text-len", type=int, default=77)
    p.add_argument("--text-dim", type=int, default=1024)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20, help="steps per timed window")
    p.add_argument("--repeats", type=int, default=3, help="timed windows")
    p.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak (default: from its name)")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (train.compile)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune (CUDA graphs)")
    p.add_argument("--channels-last", action="store_true", help="UNet and latents in channels_last memory format")
    p.add_argument("--fused-adam", action="store_true", help="AdamW(fused=True)")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--no-mask", action="store_true", help="no text attention mask (the loop passes one)")
    p.add_argument("--fp32", action="store_true", help="no autocast")
    p.add_argument("--cpu", action="store_true", help="smoke run on the CPU: tiny UNet, small batch, 2 steps")
    a = p.parse_args()
    if a.cpu:
        a.size, a.latent, a.text_len, a.text_dim = "tiny", 16, 8, 128
        a.batch, a.warmup, a.steps, a.repeats = min(a.batch, 4), 1, 2, 2
        device, name = "cpu", "cpu (smoke run)"
    elif not torch.cuda.is_available():
        raise SystemExit("gpu_train: no CUDA device; use --cpu for a smoke run")
    else:
        device, name = "cuda", torch.cuda.get_device_name()
    batch = a.batch
    while True:
        try:
            r = measure(a, device, batch)
            break
        except torch.OutOfMemoryError:
            if batch == 1:
                raise
        # Outside the except block: its traceback, and with it the failed attempt's tensors, is gone.
        print(f"batch {batch} does not fit; trying {batch // 2}", flush=True)
        batch //= 2
        gc.collect()
        torch.cuda.empty_cache()
    step_s = statistics.median(r["step_s"])
    images_s = batch / step_s
    achieved = 3 * r["flops"] / step_s
    peak = a.peak_tflops or (peak_tflops(name) if device == "cuda" else None)
    mode = a.compile_mode or "default"
    print(f"device: {name}; torch {torch.__version__}; command: {' '.join([sys.executable, *sys.argv])}")
    print(
        f"unet {a.size} ({r['params'] / 1e6:.1f}M params), latents {a.latent}x{a.latent}x4, text {a.text_len}x"
        f"{a.text_dim}{' unmasked' if a.no_mask else ''}, batch {batch}, {'fp32' if a.fp32 else 'bf16 autocast'}"
        f"{f', compiled ({mode})' if a.compile else ''}"
        f"{', channels_last' if a.channels_last else ''}{', fused AdamW' if a.fused_adam else ''}"
        f"{', grad checkpointing' if a.grad_checkpointing else ''}"
    )
    print(
        f"forward {r['flops'] / batch / 1e9:.1f} GFLOP per image; warm-up {a.warmup} steps {r['warm_s']:.1f} s; "
        f"peak memory {r['peak_gb']:.1f} GiB"
    )
    runs = ", ".join(f"{batch / s:.1f}" for s in r["step_s"])
    anchor = f"{images_s / MOSAIC_A100_IMAGES_S:.2f}x MosaicML's {MOSAIC_A100_IMAGES_S:.0f} images/s per A100"
    print(f"step {1000 * step_s:.1f} ms: {images_s:.1f} images/s (runs {runs}); {anchor}")
    if peak:
        mfu = 100 * achieved / peak / 1e12
        print(f"achieved {achieved / 1e12:.1f} TFLOP/s of {peak:.0f} peak bf16: MFU {mfu:.1f}% (goal >= 45%)")
    else:
        print(f"achieved {achieved / 1e12:.2f} TFLOP/s (MFU: pass --peak-tflops for this device)")


if __name__ == "__main__":
    main()
