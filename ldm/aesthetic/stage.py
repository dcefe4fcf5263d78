"""The train-aesthetic stage: fit (or load) the LAION MLP and report its rank correlation with ratings."""

from __future__ import annotations

import io
import time

import numpy as np
import torch

from ldm.aesthetic.model import AestheticMLP, load_aesthetic
from ldm.aesthetic.train import predict, spearman, train_aesthetic
from ldm.clip.encoder import load_encoder
from ldm.config import PipelineConfig
from ldm.io import storage
from ldm.io.manifest import StageError
from ldm.io.shards import load_image_set
from ldm.stage import StageRun, Workdir
from ldm.synthetic import heldout_set
from ldm.tracking import mlflow_run

STAGE = "train-aesthetic"
WEIGHTS = "aesthetic_mlp.pth"  # the same state-dict layout as LAION's sac+logos+ava1-l14-linearMSE.pth
HELDOUT = 500


def scatter_png(pred: np.ndarray, true: np.ndarray, rho: float) -> bytes:
    """A predicted-vs-true rating scatter plot as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    ax.scatter(true, pred, s=6, alpha=0.5)
    ax.plot([1, 10], [1, 10], color="grey", lw=1, ls="--")
    ax.set_xlabel("ground-truth rating")
    ax.set_ylabel("predicted aesthetic score")
    ax.set_title(f"held-out synthetic samples (Spearman {rho:.3f})")
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def train_aesthetic_stage(run: StageRun) -> dict:
    """Train the MLP on raw samples' ratings (or load prod weights) into W/models/aesthetic/; the manifest's fields."""
    cfg, out = run.cfg, run.out
    t0 = time.time()
    encoder = load_encoder(cfg)
    counts: dict[str, int] = {}
    if cfg.aesthetic.weights:
        model = load_aesthetic(cfg.aesthetic.weights, encoder.embed_dim)
        run.begin()
    else:
        data = load_image_set(run.workdir.raw_shards, cfg.ingest.resolution)
        rated = [i for i, m in enumerate(data.meta) if m.get("rating") is not None]
        if not rated:
            raise StageError(
                f"no sample in {run.workdir.output('ingest')} has a 'rating' to train on; "
                "set aesthetic.weights to a trained MLP"
            )
        counts = {"samples": len(rated), "skipped_shards": len(data.skipped)}
        embeddings = encoder.encode_images(data.images[rated])
        ratings = torch.tensor([data.meta[i]["rating"] for i in rated], dtype=torch.float32)
        run.begin()
        model = train_aesthetic(embeddings, ratings, cfg.aesthetic, cfg.seed)
        buf = io.BytesIO()
        torch.save(model.state_dict(), buf)
        storage.write_bytes_atomic(storage.join(out, WEIGHTS), buf.getvalue())
    metrics: dict[str, float] = {"train_s": round(time.time() - t0, 2)}
    if cfg.source.kind == "synthetic":  # ground truth exists only for the synthetic world
        held = heldout_set(cfg.source, HELDOUT, cfg.ingest.resolution)
        emb = encoder.encode_images(held.images)
        true = np.array([m["rating"] for m in held.meta])
        torch.manual_seed(cfg.seed)
        pred = predict(model, emb)
        metrics["spearman"] = spearman(pred, true)
        metrics["spearman_untrained"] = spearman(predict(AestheticMLP(encoder.embed_dim), emb), true)
        metrics["mse"] = float(np.mean((pred - true) ** 2))
        storage.write_bytes_atomic(storage.join(out, "scores.png"), scatter_png(pred, true, metrics["spearman"]))
    with mlflow_run(cfg, STAGE, run.config) as mlf:
        mlf.log_metrics(metrics)
        if "spearman" in metrics:
            mlf.log_image(_png_array(storage.join(out, "scores.png")), "scores.png")
    return dict(
        weights=cfg.aesthetic.weights or storage.join(out, WEIGHTS),
        input_size=encoder.embed_dim,
        counts=counts,
        metrics=metrics,
        skipped=[] if cfg.aesthetic.weights else data.skipped,
    )


def _png_array(url: str) -> np.ndarray:
    from PIL import Image

    fs, path = storage.fs_for(url)
    with fs.open(path, "rb") as f:
        return np.asarray(Image.open(f).convert("RGB"))


def summary(m: dict) -> str:
    """One-paragraph summary of a train-aesthetic manifest."""
    mt = m["metrics"]
    line = f"train-aesthetic: MLP {m['input_size']}-1024-128-64-16-1 from {m['weights']}"
    if "spearman" in mt:
        line += (
            f"\n  held-out Spearman {mt['spearman']:.3f} (untrained {mt['spearman_untrained']:.3f}),"
            f" MSE {mt['mse']:.2f}"
        )
    return line


def load_scorer(cfg: PipelineConfig, input_size: int) -> AestheticMLP:
    """The aesthetic MLP later stages use: prod weights by path, else the one train-aesthetic wrote."""
    if cfg.aesthetic.weights:
        return load_aesthetic(cfg.aesthetic.weights, input_size)
    folder = Workdir.of(cfg).output(STAGE)
    url = storage.join(folder, WEIGHTS)
    if not storage.exists(url):
        raise StageError(f"{url} does not exist: run the train-aesthetic stage first")
    return load_aesthetic(url, input_size)
