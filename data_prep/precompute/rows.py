"""Reading filtered shards into rows and decoding their images: the precompute's part without torch."""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np

from ldm.io.shards import decode_rgb, read_shard

Batch = dict[str, np.ndarray]

MISSING = "precompute: filtered shard {shard} sample {key} has no {what}"


class MissingField(ValueError):
    """A filtered sample without its caption or scores: the filtered output is not the filter's."""


def shard_rows(item: dict[str, Any]) -> list[dict[str, Any]]:
    """One filtered shard -> its samples as rows (image bytes still encoded).

    A missing caption or score is refused, not stored as "" or NaN: the filter writes all three.
    """
    rows = []
    for s in read_shard(item["url"]):
        meta = s.get("json", {})
        for what, value in (("caption (.txt)", s.get("txt")), ("aesthetic score", meta.get("aesthetic")),
                            ("similarity score", meta.get("similarity"))):  # fmt: skip
            if value is None:
                raise MissingField(
                    MISSING.format(shard=item["url"], key=s["key"], what=what) + "; rerun filter with --overwrite"
                )
        rows.append({
            "shard": item["name"],
            "key": s["key"],
            "jpg": s["jpg"],
            "caption": s["txt"],
            "aesthetic": float(meta["aesthetic"]),
            "similarity": float(meta["similarity"]),
        })  # fmt: skip
    return rows


def columns(rows: list[dict[str, Any]]) -> Batch:
    """Rows from shard_rows as a batch of columns (bytes and strings as object arrays)."""
    out = {}
    for k in rows[0]:
        values = [r[k] for r in rows]
        out[k] = np.array(values, dtype=np.float64) if isinstance(values[0], float) else np.array(values, dtype=object)
    return out


def row_seed(seed: int, key: str) -> int:
    """One sample's seed (its random crop, its latent sample): its key and the run's seed, whatever the batching."""
    return (seed * 1_000_003 + zlib.crc32(str(key).encode())) % 2**63


def decode_images(batch: Batch, resolution: int, crop: str = "center", seed: int = 0) -> Batch:
    """JPEG bytes -> uint8 pixels [B, H, W, 3] at the training resolution, centre or random (per key) squares."""
    out = {k: v for k, v in batch.items() if k != "jpg"}
    seeds = [row_seed(seed, k) if crop == "random" else None for k in batch["key"]]
    out["pixels"] = np.stack([decode_rgb(b, resolution, s) for b, s in zip(batch["jpg"], seeds, strict=True)])
    return out
