"""GPU section of the precompute benchmark: VAE encode images/s at 256 px with an SD-size VAE.

Runs the precompute stage's own `VaeLatentEncoder` (half precision, channels-last on a GPU) on
random 256 px pixels, with the SD 1.x/2.x VAE architecture (diffusers `AutoencoderKL`, 128-256-512-512
channels, 2 layers per block, 4 latent channels) initialised randomly and saved to a temporary
folder: the speed does not depend on the weight values, and nothing is downloaded. Pass --vae
to time a real SD VAE folder instead. Prints the device, batch sizes and images/s (median of runs).

    .venv/bin/python bench/gpu_precompute.py [--vae /models/sd-vae] [--batch 32 64 128] [--repeats 5]
    .venv/bin/python bench/gpu_precompute.py --cpu --batch 2 --resolution 64 --repeats 1   # smoke run

Exits with a message (status 2) when no CUDA device is present.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

SD_VAE = {  # the architecture of SD's AutoencoderKL (stabilityai/sd-vae-ft-mse config.json)
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 256,
    "scaling_factor": 0.18215,
}


def main() -> None:
    """Time the precompute VAE encoder on the GPU and print images/s per batch size."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vae", help="a diffusers AutoencoderKL folder; default: SD's architecture, random weights")
    p.add_argument("--batch", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--cpu", action="store_true", help="smoke-run the script on the CPU (figures meaningless)")
    a = p.parse_args()
    gpu = torch.cuda.is_available() and not a.cpu
    if not gpu and not a.cpu:
        print("no CUDA device: this benchmark needs a GPU (see docs/PERFORMANCE.md)", file=sys.stderr)
        sys.exit(2)
    from diffusers import AutoencoderKL

    from data_prep.precompute.encoders import VaeLatentEncoder
    from ldm.config import load_config

    with tempfile.TemporaryDirectory() as tmp:
        path = a.vae
        if path is None:
            torch.manual_seed(0)
            AutoencoderKL(**SD_VAE).save_pretrained(tmp)
            path = tmp
        cfg = load_config("prod", [f"compute.use_gpu={str(gpu).lower()}", f"vae.path={path}"], tmp)
        enc = VaeLatentEncoder(cfg.model_dump(mode="json"), "mean", 0)
        device = torch.cuda.get_device_name() if gpu else "CPU (smoke run)"
        print(f"device {device}, torch {torch.__version__}, VAE {a.vae or 'SD architecture'}")
        print(f"{a.resolution} px, {enc.dtype}{', channels_last' if gpu else ''}")
        rng = np.random.default_rng(0)
        sync = torch.cuda.synchronize if gpu else (lambda: None)
        for b in a.batch:
            pixels = rng.integers(0, 256, (b, a.resolution, a.resolution, 3), dtype=np.uint8)
            batch = {"key": np.array([f"{i:09d}" for i in range(b)]), "pixels": pixels}
            enc(dict(batch))  # warm-up: cuDNN autotuning, allocator
            rates = []
            for _ in range(a.repeats):
                sync()
                t = time.perf_counter()
                enc(dict(batch))  # includes host->device copy and the fp16 bytes back, as in the stage
                sync()
                rates.append(b / (time.perf_counter() - t))
            runs = ", ".join(f"{r:.0f}" for r in rates)
            print(f"  batch {b:4d}: median {statistics.median(rates):8.1f} images/s  (runs {runs})")


if __name__ == "__main__":
    main()
