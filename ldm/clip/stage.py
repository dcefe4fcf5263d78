"""The train-clip stage: train the tiny CLIP on W/raw/ into W/models/clip/, or register prod weights by path."""

from __future__ import annotations

import io
import textwrap
import time
from pathlib import Path

import numpy as np

from data_prep import manifest, storage
from data_prep.shards import ImageSet, load_image_set
from data_prep.sources import heldout_set
from ldm.clip.encoder import ClipEncoder, clip_url
from ldm.clip.model import CONFIG_FILE, WEIGHTS_FILE, load_pretrained, save_model, tiny_model_config
from ldm.clip.train import init_model, retrieval_predictions, train_clip
from ldm.config import PipelineConfig
from ldm.tracking import mlflow_run

STAGE = "train-clip"
CANDIDATES = 100  # retrieval among 100 captions: chance is 0.01
FIGURE = "retrieval.png"
FIGURE_SAMPLES = 8


def raw_manifest(cfg: PipelineConfig) -> dict:
    """The ingest manifest the tiny CLIP trains from; StageError if ingest has not finished."""
    raw = storage.join(storage.normalize(cfg.workdir), "raw")
    url = storage.join(raw, manifest.MANIFEST)
    if not storage.exists(url):
        raise manifest.StageError(f"no finished ingest in {raw} ({manifest.MANIFEST} missing); run ingest first")
    return storage.read_json(url)


def config_hash(cfg: PipelineConfig, raw_hash: str) -> str:
    """Identity of the tiny model: its section, the image resolution, the seed, and the raw data it saw."""
    return manifest.digest(
        {
            "clip": cfg.clip.model_dump(mode="json"),
            "resolution": cfg.ingest.resolution,
            "seed": cfg.seed,
            "raw": raw_hash,
        }
    )


def _register_pretrained(cfg: PipelineConfig, out: str, overwrite: bool) -> dict:
    """Prod: nothing to train; check that the weights load and record exactly which file they were."""
    arch, weights = cfg.clip.arch, cfg.clip.weights
    if not weights:
        raise manifest.StageError(f"clip.arch is {arch!r} but clip.weights is not set (a local checkpoint file)")
    path = Path(weights.removeprefix("file://")).expanduser()
    if not path.is_file():
        raise manifest.StageError(f"CLIP weights not found: {weights} (clip.weights for arch {arch})")
    # The content hash, not the path, is the identity: replaced weights at the same path are new output.
    sha = storage.file_sha256(path)
    chash = manifest.digest({"arch": arch, "weights": str(path.resolve()), "sha256": sha})
    if manifest.check_output(out, chash, overwrite) is manifest.OutputState.DONE:
        print(f"{STAGE}: {out} is up to date ({arch} from {weights}); skipping")
        return storage.read_json(storage.join(out, manifest.MANIFEST))
    manifest.begin(out, STAGE, chash)
    enc = ClipEncoder(load_pretrained(arch, weights))
    result = manifest.commit(
        out,
        STAGE,
        chash,
        {"clip": {"arch": arch, "weights": weights}},
        arch=arch,
        weights=str(path.resolve()),
        weights_sha256=sha,
        weights_bytes=path.stat().st_size,
        embed_dim=enc.embed_dim,
        token_width=enc.token_width,
        context_length=enc.context_length,
        image_size=enc.image_size,
    )
    print(f"{STAGE}: {arch} weights {weights} load (sha256 {sha[:12]}); nothing to train")
    return result


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


def run_train_clip(cfg: PipelineConfig, overwrite: bool = False) -> dict:
    """Train the tiny CLIP on W/raw/ (or register prod weights); skip if up to date. Returns the manifest."""
    out = clip_url(cfg)
    if cfg.clip.arch != "tiny":
        return _register_pretrained(cfg, out, overwrite)
    raw = raw_manifest(cfg)
    chash = config_hash(cfg, raw["config_hash"])
    if manifest.check_output(out, chash, overwrite) is manifest.OutputState.DONE:
        done = storage.read_json(storage.join(out, manifest.MANIFEST))
        print(f"{STAGE}: {out} is up to date (held-out top-1 {done.get('retrieval_top1')}); skipping")
        return done
    manifest.begin(out, STAGE, chash)
    res = cfg.ingest.resolution
    data = load_image_set(storage.join(storage.normalize(cfg.workdir), "raw", "shards"), res)
    if len(data) < 2:
        raise manifest.StageError(f"only {len(data)} readable samples in the raw shards; nothing to train CLIP on")
    # Held-out samples exist only for the synthetic world; a real URL list gets no retrieval report.
    heldout = heldout_set(cfg.source, cfg.clip.eval_samples, res) if cfg.source.kind == "synthetic" else None
    params = {
        "clip": cfg.clip.model_dump(mode="json"),
        "resolution": res,
        "seed": cfg.seed,
        "train_samples": len(data),
        "raw_config_hash": raw["config_hash"],
    }
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
    result = manifest.commit(
        out,
        STAGE,
        chash,
        {"clip": cfg.clip.model_dump(mode="json"), "resolution": res, "seed": cfg.seed},
        raw_config_hash=raw["config_hash"],
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
    print(summary(result))
    return result


def _png_image(png: bytes):
    """PNG bytes as a PIL image, which mlflow.log_image stores as-is."""
    from PIL import Image

    return Image.open(io.BytesIO(png))


def summary(m: dict) -> str:
    """A human summary of a train-clip manifest."""
    lines = [
        f"{STAGE} summary: tiny CLIP on {m['train_samples']} samples at {m['config']['resolution']} px, "
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
