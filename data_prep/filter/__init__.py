"""The filter stage: score every raw sample with CLIP and the aesthetic MLP, keep those above the thresholds."""

from __future__ import annotations

import io
import json
import os
import time
import warnings
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from tqdm import tqdm

from data_prep.filter.report import GOOD_RATING, histogram_png, precision_recall
from ldm.aesthetic.stage import load_scorer
from ldm.clip.encoder import load_encoder
from ldm.config import FilterConfig
from ldm.io import storage
from ldm.io.manifest import StageError
from ldm.io.shards import ShardError, decode_rgb, read_shard, shard_urls, write_shard
from ldm.stage import StageRun
from ldm.tracking import mlflow_run

STAGE = "filter"
REASONS = ("low_aesthetic", "low_similarity", "too_small", "watermark", "unsafe")


def drop_reason(meta: dict, aesthetic: float, similarity: float, fcfg: FilterConfig) -> str | None:
    """The first threshold a sample fails, or None to keep it."""
    if aesthetic < fcfg.aesthetic_min:
        return "low_aesthetic"
    if similarity < fcfg.similarity_min:
        return "low_similarity"
    w = meta.get("original_width") or meta.get("WIDTH")
    h = meta.get("original_height") or meta.get("HEIGHT")
    if fcfg.min_size and w and h and min(w, h) < fcfg.min_size:
        return "too_small"
    if meta.get("pwatermark") is not None and meta["pwatermark"] > fcfg.pwatermark_max:
        return "watermark"
    if meta.get("punsafe") is not None and meta["punsafe"] > fcfg.punsafe_max:
        return "unsafe"
    return None


class Scorer:
    """Scores samples in batches: aesthetic (MLP on normalised CLIP image embeddings) and image-text cosine."""

    def __init__(self, encoder, mlp: torch.nn.Module, resolution: int, batch_size: int):
        self.encoder, self.mlp, self.resolution, self.batch_size = encoder, mlp.eval(), resolution, batch_size

    @torch.no_grad()
    def __call__(self, images: np.ndarray, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(aesthetic [N], similarity [N]) for uint8 images [N,H,W,3] and their captions."""
        aesthetic, similarity = [], []
        for i in range(0, len(captions), self.batch_size):
            img = self.encoder.encode_images(images[i : i + self.batch_size])
            txt = self.encoder.encode_text(captions[i : i + self.batch_size])
            aesthetic.append(self.mlp(img).float().numpy())
            similarity.append((img * txt).sum(-1).float().numpy())
        if not aesthetic:
            return np.zeros(0), np.zeros(0)
        return np.concatenate(aesthetic), np.concatenate(similarity)


def _pause_point(name: str, written: str) -> None:
    """Test hook: with LDM_FILTER_PAUSE=<shard>:<tar|scores|stats>:<marker file>, stop after that write so a
    test can SIGKILL the stage exactly between two of a shard's writes."""
    spec = os.environ.get("LDM_FILTER_PAUSE", "")
    if spec and spec.split(":", 2)[:2] == [name, written]:
        open(spec.split(":", 2)[2], "w").close()
        time.sleep(3600)


def _decode(sample: dict, tar_url: str, resolution: int) -> np.ndarray:
    """One sample's image, or a StageError naming the shard and the key (ingest only writes decodable images)."""
    try:
        return decode_rgb(sample["jpg"], resolution)
    except (KeyError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise StageError(
            f"filter: sample {sample.get('key')!r} in {tar_url} has no decodable jpg ({type(e).__name__}: {e}); "
            "remove the shard or rerun the ingest stage with --overwrite"
        ) from e


def filter_shard(tar_url: str, shards_out: str, scorer: Scorer, fcfg: FilterConfig) -> dict:
    """Score one raw shard; write its kept samples, every sample's scores, then its stats (the done marker)."""
    samples = read_shard(tar_url)
    name = tar_url.rsplit("/", 1)[1].removesuffix(".tar")
    images = np.stack([_decode(s, tar_url, scorer.resolution) for s in samples]) if samples else np.zeros(0)
    aesthetic, similarity = scorer(images, [s.get("txt", "") for s in samples])
    kept, rows = [], []
    for s, a, c in zip(samples, aesthetic.tolist(), similarity.tolist(), strict=True):
        meta = s.get("json", {})
        reason = drop_reason(meta, a, c, fcfg)
        rows.append({"key": s["key"], "aesthetic": a, "similarity": c, "rating": meta.get("rating"), "reason": reason})
        if reason is None:
            kept.append({**s, "json": {**meta, "aesthetic": round(a, 4), "similarity": round(c, 4)}})
    write_shard(storage.join(shards_out, f"{name}.tar"), kept)
    _pause_point(name, "tar")
    schema = pa.schema(
        [
            ("key", pa.string()),
            ("aesthetic", pa.float64()),
            ("similarity", pa.float64()),
            ("rating", pa.float64()),
            ("reason", pa.string()),
        ]
    )
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buf)
    storage.write_bytes_atomic(storage.join(shards_out, f"{name}_scores.parquet"), buf.getvalue())
    _pause_point(name, "scores")
    stats = {
        "samples": len(samples),
        "kept": len(kept),
        "dropped": dict(Counter(r["reason"] for r in rows if r["reason"])),
    }
    storage.write_json_atomic(storage.join(shards_out, f"{name}_stats.json"), stats)
    _pause_point(name, "stats")
    return stats


def _read_scores(shards_out: str) -> pa.Table:
    fs, path = storage.fs_for(shards_out)
    tables = []
    for p in sorted(fs.glob(f"{path}/*_scores.parquet")):
        with fs.open(p, "rb") as f:
            tables.append(pq.read_table(f))
    return pa.concat_tables(tables) if tables else pa.table({"aesthetic": [], "similarity": [], "reason": []})


def filter_stage(run: StageRun) -> dict:
    """Filter W/raw/shards into W/filtered/shards; write filter_report.json and a score histogram."""
    cfg, out, shards_out = run.cfg, run.out, run.workdir.filtered_shards
    t0 = time.time()
    encoder = load_encoder(cfg)
    scorer = Scorer(encoder, load_scorer(cfg, encoder.embed_dim), cfg.ingest.resolution, cfg.filter.batch_size)
    run.begin()
    raw_shards = shard_urls(run.workdir.raw_shards)
    fs, out_path = storage.fs_for(shards_out)
    done = {p.rsplit("/", 1)[1].removesuffix("_stats.json") for p in fs.glob(f"{out_path}/*_stats.json")}
    skipped: list[str] = []
    for url in tqdm(raw_shards, desc="filter", unit="shard", disable=None):
        if url.rsplit("/", 1)[1].removesuffix(".tar") in done:
            continue
        try:
            filter_shard(url, shards_out, scorer, cfg.filter)
        except ShardError as e:
            warnings.warn(f"filter: skipping unreadable shard {e}", stacklevel=1)
            skipped.append(str(e))
    scores = _read_scores(shards_out)
    reasons = Counter(r for r in scores.column("reason").to_pylist() if r)
    counts = {
        "samples": scores.num_rows,
        "kept": scores.num_rows - sum(reasons.values()),
        **{r: reasons.get(r, 0) for r in REASONS},
    }
    report: dict = {"counts": counts, "thresholds": cfg.filter.model_dump(mode="json"), "skipped_shards": skipped}
    ratings = np.array([np.nan if r is None else r for r in scores.column("rating").to_pylist()], dtype=float)
    rated = ~np.isnan(ratings)
    if rated.any():  # ground truth only exists where the source ships ratings (the synthetic one)
        aesthetic = scores.column("aesthetic").to_numpy()[rated]
        report["ground_truth"] = {
            "good_rating": GOOD_RATING,
            "rated_samples": int(rated.sum()),
            **precision_recall(aesthetic, ratings[rated], cfg.filter.aesthetic_min),
        }
    storage.write_json_atomic(storage.join(out, "filter_report.json"), report)
    png = histogram_png(scores, cfg.filter)
    storage.write_bytes_atomic(storage.join(out, "scores.png"), png)
    metrics = {
        "kept": counts["kept"],
        "kept_fraction": counts["kept"] / max(1, counts["samples"]),
        "seconds": round(time.time() - t0, 2),
    }
    if "ground_truth" in report:
        metrics |= {k: report["ground_truth"][k] for k in ("precision", "recall")}
    with mlflow_run(cfg, STAGE, run.config) as mlf:
        mlf.log_metrics(metrics)
        mlf.log_dict(report, "filter_report.json")
        mlf.log_image(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), "scores.png")
    fs, out_path = storage.fs_for(shards_out)  # a fresh listing: the shards were written since
    stats = {
        p.rsplit("/", 1)[1].removesuffix("_stats.json"): json.loads(fs.cat(p))
        for p in fs.glob(f"{out_path}/*_stats.json")
    }
    return dict(
        counts=counts,
        skipped_shards=len(skipped),
        skipped=skipped,
        metrics=metrics,
        shards=[{"name": f"{k}.tar", "samples": v["kept"]} for k, v in sorted(stats.items())],
        report=storage.join(out, "filter_report.json"),
        filter_report=report,
    )


def summary(m: dict) -> str:
    """A human summary of the filter manifest and its report."""
    report = m["filter_report"]
    c = report["counts"]
    lines = [f"filter summary: kept {c['kept']} of {c['samples']} samples"]
    lines += [f"  dropped {r:<15} {c[r]:>7}" for r in REASONS if c[r]]
    if report["skipped_shards"]:
        lines.append(f"  skipped {len(report['skipped_shards'])} unreadable shard(s)")
    gt = report.get("ground_truth")
    if gt:
        lines.append(
            f"  vs ground-truth ratings (good = rating >= {gt['good_rating']:g}): "
            f"precision {gt['precision']:.3f}, recall {gt['recall']:.3f}"
        )
    return "\n".join(lines)
