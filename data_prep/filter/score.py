"""Scoring raw shards: CLIP image-text similarity and the aesthetic MLP, one shard at a time, in a Ray Data actor.

`filter_shard` scores one raw shard and writes its three outputs (kept samples, every sample's scores,
then its stats: the done marker) from the process that scored it; `ShardFilter` is the actor that
loads the models once and calls it per shard. The stats carry everything the stage's report needs
(counts by reason, score histograms, ground-truth counts), so the report never reads a row.
"""

from __future__ import annotations

import io
import os
import time
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from data_prep.filter.report import GOOD_RATING, shard_histograms, truth_counts
from ldm.config import FilterConfig, PipelineConfig
from ldm.io import storage
from ldm.io.manifest import StageError
from ldm.io.shards import ShardError, decode_rgb, read_shard, write_shard

SCORES = pa.schema([
    ("key", pa.string()),
    ("aesthetic", pa.float64()),
    ("similarity", pa.float64()),
    ("rating", pa.float64()),
    ("reason", pa.string()),
])  # fmt: skip


def drop_reason(aesthetic: float, similarity: float, fcfg: FilterConfig) -> str | None:
    """The first threshold a sample's scores fail, or None to keep it (the metadata's are ingest.prefilter's)."""
    if aesthetic < fcfg.aesthetic_min:
        return "low_aesthetic"
    if similarity < fcfg.similarity_min:
        return "low_similarity"
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
    test can SIGKILL the stage (or the node running it) exactly between two of a shard's writes.

    The marker holds the Ray node id of the process that paused; it pauses once per marker, so the attempt
    Ray retries after the kill goes on.
    """
    spec = os.environ.get("LDM_FILTER_PAUSE", "")
    if not spec or spec.split(":", 2)[:2] != [name, written]:
        return
    marker = spec.split(":", 2)[2]
    if os.path.exists(marker):
        return
    import ray

    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    with open(f"{marker}.tmp", "w") as f:
        f.write(node)
    os.replace(f"{marker}.tmp", marker)  # whole or absent: the test reads the node id once it appears
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
        reason = drop_reason(a, c, fcfg)
        rows.append({"key": s["key"], "aesthetic": a, "similarity": c, "rating": meta.get("rating"), "reason": reason})
        if reason is None:
            kept.append({**s, "json": {**meta, "aesthetic": round(a, 4), "similarity": round(c, 4)}})
    write_shard(storage.join(shards_out, f"{name}.tar"), kept)
    _pause_point(name, "tar")
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=SCORES), buf)
    storage.write_bytes_atomic(storage.join(shards_out, f"{name}_scores.parquet"), buf.getvalue())
    _pause_point(name, "scores")
    is_kept = np.array([r["reason"] is None for r in rows], dtype=bool)
    ratings = np.array([np.nan if r["rating"] is None else r["rating"] for r in rows], dtype=float)
    rated = ~np.isnan(ratings)
    stats = {
        "samples": len(samples),
        "kept": len(kept),
        "dropped": dict(Counter(r["reason"] for r in rows if r["reason"])),
        "hist": shard_histograms(aesthetic, similarity, is_kept),
        # ground truth only exists where the source ships ratings (the synthetic one)
        "truth": truth_counts(aesthetic[rated], ratings[rated], fcfg.aesthetic_min, GOOD_RATING),
    }
    storage.write_json_atomic(storage.join(shards_out, f"{name}_stats.json"), stats)
    _pause_point(name, "stats")
    return stats


class ShardFilter:
    """A Ray Data actor: loads CLIP and the aesthetic MLP once, then filters one raw shard per call.

    An unreadable shard is returned as an error, not raised, so the other shards go on and the stage
    decides (fail without committing, or --allow-partial). Returns one small row per shard.
    """

    def __init__(self, cfg_dict: dict[str, Any], shards_out: str):
        from ldm.aesthetic.stage import load_scorer
        from ldm.clip.encoder import load_encoder

        cfg = PipelineConfig.model_validate(cfg_dict)
        gpu = cfg.compute.use_gpu and torch.cuda.is_available()
        if not cfg.compute.use_gpu:
            torch.set_num_threads(1)  # one core per actor: Ray runs as many actors as cores allow
        encoder = load_encoder(cfg)
        if gpu:
            encoder.model.to("cuda")  # the MLP is a few kFLOPs per image: it stays on the CPU
        mlp = load_scorer(cfg, encoder.embed_dim)
        self.scorer = Scorer(encoder, mlp, cfg.ingest.resolution, cfg.filter.batch_size)
        self.fcfg, self.shards_out = cfg.filter, shards_out

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Raw shard URLs (`url`) -> `name`, `samples`, `kept` and `error` ("" when the shard was filtered)."""
        out: dict[str, list] = {"name": [], "samples": [], "kept": [], "error": []}
        for url in batch["url"]:
            url = str(url)
            try:
                stats, error = filter_shard(url, self.shards_out, self.scorer, self.fcfg), ""
            except ShardError as e:
                stats, error = {"samples": 0, "kept": 0}, str(e)
            out["name"].append(url.rsplit("/", 1)[1])
            out["samples"].append(stats["samples"])
            out["kept"].append(stats["kept"])
            out["error"].append(error)
        return {k: np.array(v) for k, v in out.items()}
