"""The latent-row format of W/latents/ (written by precompute, read by training): schema, parts, checked reader."""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ldm.io import manifest, storage

EXPECTABLE = ("latent_shape", "text_dim", "vae")
SCHEMA = pa.schema([
    ("key", pa.string()),
    ("latent", pa.binary()),  # fp16 [C, h, w], C-order
    ("scale_factor", pa.float32()),
    ("latent_is_sample", pa.bool_()),
    ("text_emb", pa.binary()),  # fp16 [text_len, D]: no padding beyond the caption's true length
    ("text_len", pa.int32()),
    ("caption", pa.string()),
    ("aesthetic", pa.float32()),
    ("similarity", pa.float32()),
])  # fmt: skip


def part_bytes(rows: list[dict], shape: tuple[int, ...], text_dim: int) -> bytes:
    """One shard's rows as Parquet bytes, rows in key order, with the shapes in the file's metadata."""
    rows = sorted(rows, key=lambda r: r["key"])
    table = pa.Table.from_pylist([{k: r[k] for k in SCHEMA.names} for r in rows], schema=SCHEMA)
    meta = {b"latent_shape": ",".join(map(str, shape)).encode(), b"text_dim": str(text_dim).encode()}
    buf = io.BytesIO()
    pq.write_table(table.replace_schema_metadata(meta), buf)
    return buf.getvalue()


def load_latent_manifest(latents_url: str) -> dict:
    """The precompute manifest; refuses a folder whose precompute never finished."""
    url = storage.join(latents_url, manifest.MANIFEST)
    if not storage.exists(url):
        parts = storage.listdir(storage.join(latents_url, "parts"), "*.parquet") if storage.exists(latents_url) else []
        why = f"{len(parts)} parts but no manifest: the precompute did not finish" if parts else "no latents there"
        raise manifest.StageError(f"{url} does not exist ({why}); run the precompute stage")
    return storage.read_json(url)


def check_expectations(m: dict, latents_url: str, expect: dict[str, Any]) -> None:
    """Refuse latents that are not what training expects, naming both values."""
    for key in EXPECTABLE:
        if key in expect and expect[key] is not None and m.get(key) != expect[key]:
            raise manifest.StageError(
                f"latents in {latents_url} have {key} {m.get(key)!r} but training expects {expect[key]!r}"
            )


def verify_parts(latents_url: str, m: dict) -> list[str]:
    """URLs of the manifest's parts, each checked from its footer: readable, right shape, right row count."""
    urls = []
    shape = ",".join(map(str, m["latent_shape"])).encode()
    for part in m["parts"]:
        url = storage.join(latents_url, "parts", part["name"])
        fs, path = storage.fs_for(url)
        if not fs.exists(path):
            raise manifest.StageError(f"latent part {url} listed in the manifest is missing")
        try:
            with fs.open(path, "rb") as f:
                meta = pq.ParquetFile(f).metadata
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a damaged footer
            raise manifest.StageError(f"latent part {url} is not a readable Parquet file: {e}") from e
        kv = meta.metadata or {}
        if kv.get(b"latent_shape") != shape:
            got = kv.get(b"latent_shape", b"none").decode()
            raise manifest.StageError(
                f"latent part {url} has latent shape [{got}], the manifest says {m['latent_shape']}"
            )
        if meta.num_rows != part["rows"]:
            raise manifest.StageError(f"latent part {url} has {meta.num_rows} rows, the manifest says {part['rows']}")
        urls.append(url)
    if not urls:
        raise manifest.StageError(f"{latents_url} has no latent parts")
    return urls


def latent_dataset(latents_url: str, expect: dict[str, Any] | None = None, shuffle_seed: int | None = None):
    """A Ray Dataset of latent rows for `get_dataset_shard`, files shuffled when a seed is given.

    Returns (dataset, manifest). Pair with `iter_batches(local_shuffle_buffer_size=...)` and `collate`.
    """
    import pyarrow.fs as pafs
    import ray
    from ray.data import FileShuffleConfig

    m = load_latent_manifest(latents_url)
    check_expectations(m, latents_url, expect or {})
    urls = verify_parts(latents_url, m)
    fs, _ = storage.fs_for(urls[0])
    paths = [storage.fs_for(u)[1] for u in urls]
    ds = ray.data.read_parquet(
        paths,
        filesystem=pafs.PyFileSystem(pafs.FSSpecHandler(fs)),
        shuffle=FileShuffleConfig(seed=shuffle_seed) if shuffle_seed is not None else None,
    )
    return ds, m


def collate(batch: dict[str, np.ndarray], latent_shape: list[int], text_dim: int) -> dict[str, Any]:
    """Rows -> tensors: latents float32 [B,C,h,w] times each row's scale factor; text states float32 [B,L,D]
    padded to the batch's longest caption, with a bool attention mask [B,L] (True on real tokens).

    The stored latents are the VAE's own; the diffusion process expects data of unit variance, so, as in
    Stable Diffusion (z * 0.18215), they are multiplied by the scale factor here and divided by it before
    decoding.
    """
    import torch

    n = len(batch["latent"])
    latents = np.stack([np.frombuffer(b, np.float16).reshape(latent_shape) for b in batch["latent"]])
    latents = latents.astype(np.float32) * np.asarray(batch["scale_factor"], np.float32).reshape(-1, 1, 1, 1)
    lengths = np.asarray(batch["text_len"], dtype=np.int64)
    longest = int(lengths.max()) if n else 0
    text = np.zeros((n, longest, text_dim), np.float32)
    for i, (b, length) in enumerate(zip(batch["text_emb"], lengths, strict=True)):
        text[i, :length] = np.frombuffer(b, np.float16).reshape(length, text_dim)
    mask = np.arange(longest)[None, :] < lengths[:, None]
    return {
        "latents": torch.from_numpy(latents),
        "text": torch.from_numpy(text),
        "mask": torch.from_numpy(mask),
        "lengths": torch.from_numpy(lengths),
    }


def empty_prompt(m: dict):
    """The empty caption's token states [L, D] (float32) from a latent manifest."""
    import torch

    e = m["empty_prompt"]
    arr = np.frombuffer(base64.b64decode(e["data_b64"]), np.float16).reshape(e["shape"])
    return torch.from_numpy(arr.astype(np.float32))
