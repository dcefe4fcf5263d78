"""The train-clip stage: train the tiny CLIP on W/raw/ into W/models/clip/, or register prod weights by path."""

from __future__ import annotations

import io
import textwrap
import time
from pathlib import Path

import numpy as np

from ldm.clip.encoder import ClipEncoder
from ldm.clip.model import CONFIG_FILE, WEIGHTS_FILE, load_pretrained, save_model, tiny_model_config
from ldm.clip.train import init_model, retrieval_predictions, train_clip
from ldm.io import storage
from ldm.io.manifest import StageError
from ldm.io.shards import ImageSet, load_image_set
from ldm.stage import StageRun
from ldm.synthetic import heldout_set
from ldm.tracking import mlflow_run

STAGE = "train-clip"
CANDIDATES = 100  # retrieval among 100 captions: chance is 0.01
FIGURE = "retrieval.png"
FIGURE_SAMPLES = 8


def _register_pretrained(run: StageRun) -> dict:
    """Prod: nothing to train; check that the weights load and record exactly which file they were."""
    arch, weights = run.cfg.clip.arch, run.cfg.clip.weights
    if not weights:
        raise StageError(f"clip.arch is {arch!r} but clip.weights is not set (a local checkpoint file)")
    path = Path(str(weights).removeprefix("file://")).expanduser()
    run.begin()
    enc = ClipEncoder(load_pretrained(arch, str(weights)))
    print(f"{STAGE}: {arch} weights {weights} load; nothing to train")
    return dict(
        arch=arch,
        weights=str(path.resolve()),
        weights_sha256=storage.file_sha256(path),
        weights_bytes=path.stat().st_size,
        embed_dim=enc.embed_dim,
        token_width=enc.token_width,
        context_length=enc.context_length,
        image_size=enc.image_size,
    )


def retrieval_figure(heldout: ImageSet, picks: np.ndarray, n: int = FIGURE_SAMPLES) -> bytes:
    """PNG of the first n held-out images, each titled with the caption it retrieved (green = correct)."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on training machines
    import matplotlib.pyplot as plt

    n = min(n, len(picks))
    cols = 4
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 4.2 * rows), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= n:
            continue
        got, true = heldout.captions[picks[k]], heldout.captions[k]
        ax.imshow(heldout.images[k])
        title = textwrap.fill(got, 34) if got == true else textwrap.fill(f"{got}\n(true: {true})", 34)
        ax.set_title(title, fontsize=7, color="darkgreen" if got == true else "firebrick")
    fig.suptitle(f"held-out image -> top-1 caption among {CANDIDATES}", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.97))  # leave room for the suptitle above the first row's captions
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _top1(encoder: ClipEncoder, heldout: ImageSet) -> tuple[float, np.ndarray]:
    picks = retrieval_predictions(encoder, heldout.images, heldout.captions, CANDIDATES)
    hits = [heldout.captions[p] == heldout.captions[i] for i, p in enumerate(picks)]
    return float(np.mean(hits)), picks


def train_clip_stage(run: StageRun) -> dict:
    """Train the tiny CLIP on W/raw/ (or register prod weights by path); the manifest's fields."""
    cfg, out = run.cfg, run.out
    if cfg.clip.arch != "tiny":
        return _register_pretrained(run)
    run.begin()
    res = cfg.ingest.resolution
    data = load_image_set(run.workdir.raw_shards, res)
    if len(data) < 2:
        raise StageError(f"only {len(data)} readable samples in the raw shards; nothing to train CLIP on")
    # Held-out samples exist only for the synthetic world; a real URL list gets no retrieval report.
    heldout = heldout_set(cfg.source, cfg.clip.eval_samples, res) if cfg.source.kind == "synthetic" else None
    params = {**run.config, "train_samples": len(data), "raw_config_hash": run.inputs["ingest"]["config_hash"]}
    metrics: dict[str, float] = {}
    losses: list[float] = []
    with mlflow_run(cfg, STAGE, params) as mlflow:
        run_id = mlflow.active_run().info.run_id
        if heldout is not None:
            metrics["retrieval_top1_untrained"], _ = _top1(ClipEncoder(init_model(cfg.clip, res, cfg.seed)), heldout)

        def on_epoch(epoch: int, loss: float) -> None:
            losses.append(loss)
            mlflow.log_metric("loss", loss, step=epoch)

        t0 = time.time()
        model = train_clip(data.images, data.captions, cfg.clip, cfg.seed, on_epoch=on_epoch)
        metrics["train_seconds"] = round(time.time() - t0, 2)
        metrics["final_loss"] = round(losses[-1], 4)
        save_model(model, tiny_model_config(cfg.clip, res), out)
        files = [CONFIG_FILE, WEIGHTS_FILE]
        if heldout is not None:
            metrics["retrieval_top1"], picks = _top1(ClipEncoder(model), heldout)
            png = retrieval_figure(heldout, picks)
            storage.write_bytes_atomic(storage.join(out, FIGURE), png)
            mlflow.log_image(_png_image(png), FIGURE)
            files.append(FIGURE)
        mlflow.log_metrics(metrics)
    return dict(
        arch="tiny",
        files=files,
        train_samples=len(data),
        skipped_shards=len(data.skipped),
        skipped=data.skipped,
        heldout_samples=len(heldout) if heldout is not None else 0,
        candidates=CANDIDATES,
        mlflow_run_id=run_id,
        **metrics,
    )


def _png_image(png: bytes):
    """PNG bytes as a PIL image, which mlflow.log_image stores as-is."""
    from PIL import Image

    return Image.open(io.BytesIO(png))


def summary(m: dict) -> str:
    """A human summary of a train-clip manifest."""
    if m["arch"] != "tiny":
        return f"{STAGE}: {m['arch']} weights {m['weights']} (sha256 {m['weights_sha256'][:12]})"
    lines = [
        f"{STAGE} summary: tiny CLIP on {m['train_samples']} samples at {m['config']['ingest.resolution']} px, "
        f"{m['config']['clip']['epochs']} epochs in {m['train_seconds']:.0f} s (final loss {m['final_loss']:.3f})"
    ]
    if m.get("retrieval_top1") is not None:
        lines.append(
            f"  held-out image->text top-1 among {m['candidates']}: {m['retrieval_top1']:.3f} "
            f"(untrained {m['retrieval_top1_untrained']:.3f}, chance {1 / m['candidates']:.3f})"
        )
    else:
        lines.append("  no held-out retrieval report (only the synthetic source has held-out samples)")
    if m.get("skipped_shards"):
        lines.append(f"  skipped {m['skipped_shards']} unreadable shard(s)")
    return "\n".join(lines)
