"""The train-vae stage: train the KL autoencoder on W/filtered/ into W/models/vae/, or verify the prod VAE."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from ldm import budget
from ldm.autoencoder.model import build_vae, load_vae_folder, local_path, weights_file
from ldm.autoencoder.train import (
    latent_scale_factor,
    loss_name,
    psnr,
    psnr_per_image,
    reconstruction_grid,
    step_seconds,
    train_vae,
)
from ldm.io import storage
from ldm.io.manifest import StageError
from ldm.io.shards import load_image_set
from ldm.stage import StageRun
from ldm.synthetic import heldout_set
from ldm.tracking import mlflow_run

STAGE = "train-vae"
HELDOUT_N = 256  # held-out synthetic images for the PSNR report
GOOD_RATING = 5.0  # the filter's default aesthetic_min: PSNR on images that would pass it, reported apart
HISTORY_POINTS = 200  # loss curve points sent to MLflow


def _run_pretrained(run: StageRun) -> dict:
    """Prod: nothing to train. Verify the folder loads and record its path and weights hash."""
    cfg = run.cfg
    folder = local_path(cfg.vae.path or "")
    vae = load_vae_folder(folder)
    downsample = 2 ** (len(vae.config.block_out_channels) - 1)
    if downsample != cfg.vae.downsample:
        raise StageError(
            f"VAE at {folder} downsamples by {downsample}, config says vae.downsample={cfg.vae.downsample}"
        )
    run.begin()
    wfile = weights_file(folder)
    latent = cfg.ingest.resolution // downsample
    print(f"train-vae: using the pretrained VAE at {folder}; nothing to train")
    return dict(
        pretrained={"path": str(folder), "weights_file": wfile.name, "sha256": storage.file_sha256(wfile)},
        scale_factor=float(vae.config.scaling_factor),
        latent_shape=[int(vae.config.latent_channels), latent, latent],
    )


def _log_history(mlflow, history: dict[str, list[float]]) -> None:
    """Send a subsampled loss curve in one batch (one SQLite write per point would dominate small runs)."""
    from mlflow.entities import Metric

    steps = len(history["loss"])
    every = max(1, steps // HISTORY_POINTS)
    now = int(time.time() * 1000)
    metrics = [
        Metric(f"train_{key}", history[key][s], now, s) for s in range(0, steps, every) for key in ("loss", "rec", "kl")
    ]
    client, run_id = mlflow.MlflowClient(), mlflow.active_run().info.run_id
    for i in range(0, len(metrics), 1000):  # MLflow's per-request limit
        client.log_batch(run_id, metrics=metrics[i : i + 1000])


def _upload_folder(local: Path, url: str) -> list[str]:
    names = sorted(p.name for p in local.iterdir() if p.is_file())
    for name in names:
        storage.write_bytes_atomic(storage.join(url, name), (local / name).read_bytes())
    return names


def _run_train(run: StageRun) -> dict:
    """Embedded default: train on W/filtered/shards, evaluate on held-out images, save in diffusers layout."""
    cfg, out = run.cfg, run.out
    started = time.time()
    res, vcfg = cfg.ingest.resolution, cfg.vae
    shards_url = run.workdir.filtered_shards
    data = load_image_set(shards_url, res)  # unreadable shards: warned, skipped, counted below
    if len(data) == 0:
        raise StageError(f"no readable samples in {shards_url} ({len(data.skipped)} shards skipped)")
    run.begin()
    sized = budget.sized(cfg, STAGE, run.config_hash, vcfg.steps, lambda: step_seconds(data.images, vcfg, cfg.seed))
    if sized is not None:  # this CPU's count for the seconds it has: the run is one of that many steps
        vcfg = vcfg.model_copy(update={"steps": sized["steps"]})
        print(f"train-vae: {sized['steps']:,} of {sized['full_steps']:,} steps ({sized['step_s']:.3f} s a step, "
              f"{sized['seconds']:.0f} s){' as recorded' if sized.get('reused') else ''}")  # fmt: skip
    heldout = heldout_set(cfg.source, HELDOUT_N, res) if cfg.source.kind == "synthetic" else None
    eval_images = heldout.images if heldout is not None else data.images[:HELDOUT_N]
    good = np.array([(m.get("rating") or 0) >= GOOD_RATING for m in heldout.meta]) if heldout is not None else None
    loss = loss_name(vcfg)
    params = {
        "vae": vcfg.model_dump(mode="json"),
        "resolution": res,
        "seed": cfg.seed,
        "train_images": len(data),
        "loss": loss,
        "eval_set": "heldout" if heldout is not None else "train_sample",
        "budget": sized,
    }
    with mlflow_run(cfg, STAGE, params) as mlflow:
        untrained = psnr_per_image(build_vae(vcfg, res, cfg.seed), eval_images)  # train_vae starts from these weights
        t0 = time.time()
        vae, history = train_vae(data.images, vcfg, cfg.seed)
        train_s = time.time() - t0
        scale = latent_scale_factor(vae, data.images, seed=cfg.seed)
        vae.register_to_config(scaling_factor=scale)  # saved in config.json, read back as vae.config.scaling_factor
        trained = psnr_per_image(vae, eval_images)
        tail = max(1, len(history["loss"]) // 20)  # final losses: mean of the last 5% of steps, not one noisy batch
        metrics = {
            "psnr": float(trained.mean()),
            "psnr_untrained": float(untrained.mean()),
            "scale_factor": scale,
            "final_loss": float(np.mean(history["loss"][-tail:])),
            "final_rec": float(np.mean(history["rec"][-tail:])),
            "final_kl": float(np.mean(history["kl"][-tail:])),
            "train_seconds": train_s,
        }
        if good is not None and good.any():
            metrics["psnr_rating_ge5"] = float(trained[good].mean())
        if heldout is not None:  # the gap to held-out PSNR shows over- or underfitting
            metrics["psnr_train"] = psnr(vae, data.images[:HELDOUT_N])
        with tempfile.TemporaryDirectory() as tmp:
            model_dir, grid = Path(tmp) / "vae", Path(tmp) / "reconstructions.png"
            vae.save_pretrained(model_dir, safe_serialization=True)
            files = _upload_folder(model_dir, out)
            reconstruction_grid(vae, eval_images, grid)
            storage.write_bytes_atomic(storage.join(out, grid.name), grid.read_bytes())
            mlflow.log_metrics(metrics)
            _log_history(mlflow, history)
            mlflow.log_artifact(str(grid))
        run_id = mlflow.active_run().info.run_id
    f = vcfg.downsample
    return dict(
        loss={
            "name": loss,
            "kl_weight": vcfg.kl_weight,
            "l2_weight": vcfg.l2_weight,
            "edge_weight": vcfg.edge_weight,
            "lpips": lpips_note(vcfg),
        },
        eval={
            "set": f"heldout synthetic ({HELDOUT_N} images)" if heldout is not None else "training sample",
            "psnr_recon": "posterior mean, [0,1] pixels, mean of per-image PSNR",
            "rating_ge5_images": int(good.sum()) if good is not None else None,
        },
        metrics={k: v if k == "scale_factor" else round(v, 4) for k, v in metrics.items()},
        latent_shape=[vcfg.latent_channels, res // f, res // f],
        train_images=len(data),
        steps=vcfg.steps,
        budget=sized,
        skipped_shards=len(data.skipped),
        skipped=data.skipped,
        files=[*files, "reconstructions.png"],
        mlflow_run_id=run_id,
        timings={"train_s": round(train_s, 2), "total_s": round(time.time() - started, 2)},
    )


def lpips_note(vcfg) -> str:
    """What the report says about LPIPS: which weights ran, or why it did not."""
    if vcfg.lpips_vgg and vcfg.lpips_weight:
        return f"LPIPS (weight {vcfg.lpips_weight:g}) from {vcfg.lpips_vgg} and {vcfg.lpips_lin}"
    return "LPIPS not used: vae.lpips_vgg / vae.lpips_lin name no local weights, and nothing is downloaded"


def summary(m: dict) -> str:
    """A short human summary of a train-vae manifest."""
    if "pretrained" in m:
        return f"train-vae: pretrained VAE {m['pretrained']['path']} (scale factor {m['scale_factor']})"
    mt = m["metrics"]
    steps = m.get("steps", m["config"]["vae"]["steps"])
    lines = [
        f"train-vae: {m['train_images']} images, {steps} steps in {mt['train_seconds']:.0f} s, "
        f"loss {m['loss']['name']}, {m['skipped_shards']} shards skipped",
        f"  PSNR ({m['eval']['set']}): {mt['psnr_untrained']:.2f} dB untrained -> {mt['psnr']:.2f} dB trained"
        + (f"; rating>={GOOD_RATING:g}: {mt['psnr_rating_ge5']:.2f} dB" if "psnr_rating_ge5" in mt else ""),
        f"  latents {m['latent_shape']}, scale factor {mt['scale_factor']:.4f}",
    ]
    return "\n".join(lines)


def train_vae_stage(run: StageRun) -> dict:
    """Make W/models/vae/ (trained, or a record of cfg.vae.path in prod); the manifest's fields."""
    return _run_pretrained(run) if run.cfg.vae.path else _run_train(run)
