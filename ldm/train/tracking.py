"""MLflow for a training run: the run the driver creates once, rank 0's re-opening of it, sample grids."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch

from ldm.config import PipelineConfig
from ldm.io import storage
from ldm.tracking import mlflow_run, tracking_uri

RUN_FILE = "mlflow_run.json"


def ensure_run(cfg: PipelineConfig, run_dir: str, params: dict[str, Any]) -> str:
    """The MLflow run id of this training run: read from the run folder, or created (params logged) and stored."""
    url = storage.join(run_dir, RUN_FILE)
    if storage.exists(url):  # a resumed or restarted run continues its MLflow run instead of forking
        return storage.read_json(url)["run_id"]
    with mlflow_run(cfg, f"train/{cfg.train.run_id}", params) as mlflow:
        run_id = mlflow.active_run().info.run_id
    storage.write_json_atomic(url, {"run_id": run_id})
    return run_id


def open_run(cfg: PipelineConfig, run_id: str):
    """Re-open an existing MLflow run in this process (with system metrics); returns the mlflow module."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(cfg))
    try:
        mlflow.start_run(run_id=run_id, log_system_metrics=True)
    except Exception:  # noqa: BLE001 - system metrics need optional packages; the run matters more
        mlflow.start_run(run_id=run_id)
    return mlflow


def grid_png(images: torch.Tensor) -> bytes:
    """Images [N, 3, H, W] in [-1, 1] as one PNG row."""
    from PIL import Image

    x = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    row = np.concatenate(list(x), axis=1)
    buf = io.BytesIO()
    Image.fromarray(row).save(buf, format="PNG")
    return buf.getvalue()


def log_grid(mlflow, cfg: PipelineConfig, sampler: dict | None, ema, step: int) -> None:
    """Sample the fixed prompts from the EMA weights, decode them with the VAE and log the grid PNG."""
    if sampler is None:
        return
    from ldm.autoencoder.model import load_vae_folder
    from ldm.train.export import decode, sample_latents
    from ldm.unet.init import build_for

    shape = sampler["latent_shape"]
    unet = build_for(cfg.unet.size, shape, sampler["text_dim"], sampler.get("init"))
    ema.copy_to(unet)
    states = torch.tensor(sampler["prompt_states"], dtype=torch.float32)
    lengths = torch.tensor(sampler["prompt_lengths"])
    empty = torch.tensor(sampler["empty_states"], dtype=torch.float32)
    latents = sample_latents(unet, cfg.diffusion, states, lengths, empty, cfg.train.sample_steps,
                             cfg.train.guidance, cfg.seed, shape)  # fmt: skip
    images = decode(load_vae_folder(sampler["vae_dir"]), latents, sampler["scale_factor"])
    mlflow.log_image(np.asarray(_png_array(grid_png(images))), f"samples/step{step:07d}.png")


def _png_array(data: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB")
