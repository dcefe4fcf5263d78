"""Read webdataset tar shards sample by sample through fsspec (local or s3)."""

from __future__ import annotations

import io
import json
import tarfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from ldm.io import storage


def _samples(tar: tarfile.TarFile) -> Iterator[dict[str, Any]]:
    current: dict[str, Any] = {}
    for member in tar:
        if not member.isfile():
            continue
        key, _, ext = member.name.rpartition("/")[2].partition(".")
        if current and current["key"] != key:
            yield current
            current = {}
        data = tar.extractfile(member).read()  # type: ignore[union-attr]
        current["key"] = key
        if ext == "json":
            current[ext] = json.loads(data)
        elif ext == "txt":
            current[ext] = data.decode("utf-8")
        else:
            current[ext] = data
    if current:
        yield current


def iter_samples(tar_url: str) -> Iterator[dict[str, Any]]:
    """Yield one dict per sample of a webdataset tar: `key` plus one entry per file extension.

    `.json` members are parsed and `.txt` decoded; other members (images) stay bytes. Streams the
    shard without checking its end: use `read_shard` where a truncated shard must be refused.
    """
    fs, path = storage.fs_for(tar_url)
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        yield from _samples(tar)


class ShardError(RuntimeError):
    """A shard that cannot be read to the end (truncated or corrupt tar)."""


def read_shard(tar_url: str) -> list[dict[str, Any]]:
    """All samples of one shard in key order, or ShardError: a shard is used whole or not at all.

    tarfile stops quietly at a header cut short, so a shard truncated between members would read
    as a shorter, valid one; we also require the end-of-archive marker (two zero blocks).

    Key order, not tar order: img2dataset writes samples as their downloads finish, so two ingests of
    the same source order a shard differently, and every model trained on it (same seed, same bytes)
    came out different (train-clip top-1 0.698 in one demo, 0.678 in the next).
    """
    fs, path = storage.fs_for(tar_url)
    try:
        size = fs.size(path)
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            samples = list(_samples(tar))
            end = tar.offset
        with fs.open(path, "rb") as f:
            f.seek(end)
            trailer = f.read(2 * tarfile.BLOCKSIZE)
    except (tarfile.TarError, EOFError, OSError, ValueError, UnicodeDecodeError) as e:
        raise ShardError(f"{tar_url}: {e.__class__.__name__}: {e}") from e
    if size - end < 2 * tarfile.BLOCKSIZE or trailer.strip(b"\0"):
        raise ShardError(f"{tar_url}: truncated (no end-of-archive marker after {len(samples)} samples)")
    return sorted(samples, key=lambda s: s["key"])


def shard_urls(folder_url: str) -> list[str]:
    """Sorted URLs of the webdataset tars in a folder."""
    return storage.listdir(folder_url, "*.tar")


@dataclass
class ImageSet:
    """Decoded samples held in memory: enough for the embedded default's component training."""

    images: np.ndarray  # uint8 [N, H, W, 3]
    captions: list[str]
    meta: list[dict[str, Any]]
    keys: list[str]
    skipped: list[str] = field(default_factory=list)  # shards that could not be read, with the reason

    def __len__(self) -> int:
        return len(self.captions)


def decode_rgb(data: bytes, resolution: int | None = None, crop_seed: int | None = None) -> np.ndarray:
    """Decode image bytes to uint8 HxWx3, centre-cropped and resized to a square if resolution is set.

    With crop_seed, SD's random crop instead: the short side resized to the resolution, then a square at
    an offset drawn from the seed along the long side (the same square every time for the same seed).
    """
    img = Image.open(io.BytesIO(data)).convert("RGB")
    if resolution is not None and crop_seed is not None:
        w, h = img.size
        scale = resolution / min(w, h)
        size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
        if size != (w, h):
            img = img.resize(size, Image.Resampling.BICUBIC)
        slack = max(size) - resolution
        offset = int(np.random.default_rng(crop_seed).integers(0, slack + 1)) if slack else 0
        x, y = (offset, 0) if size[0] > size[1] else (0, offset)
        img = img.crop((x, y, x + resolution, y + resolution))
    elif resolution is not None and img.size != (resolution, resolution):
        w, h = img.size
        s = min(w, h)
        img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        img = img.resize((resolution, resolution), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


def load_image_set(folder_url: str, resolution: int | None = None, image_ext: str = "jpg") -> ImageSet:
    """Read every sample of every shard in a folder; unreadable shards are skipped with a warning."""
    images, captions, meta, keys, skipped = [], [], [], [], []
    for url in shard_urls(folder_url):
        try:
            samples = read_shard(url)
        except ShardError as e:
            warnings.warn(f"skipping unreadable shard {e}", stacklevel=2)
            skipped.append(str(e))
            continue
        for s in samples:
            images.append(decode_rgb(s[image_ext], resolution))
            captions.append(s.get("txt", ""))
            meta.append(s.get("json", {}))
            keys.append(s["key"])
    arr = np.stack(images) if images else np.zeros((0, resolution or 0, resolution or 0, 3), np.uint8)
    return ImageSet(arr, captions, meta, keys, skipped)


def write_shard(tar_url: str, samples: list[dict[str, Any]]) -> None:
    """Write samples as a webdataset tar, atomically (a reader never sees half a shard).

    Each sample is a dict with `key` and one entry per extension: dicts become .json, str .txt, bytes as-is.
    """
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for s in samples:
            for ext, value in s.items():
                if ext == "key":
                    continue
                if isinstance(value, dict):
                    data = json.dumps(value, sort_keys=True).encode()
                elif isinstance(value, str):
                    data = value.encode("utf-8")
                else:
                    data = bytes(value)
                info = tarfile.TarInfo(f"{s['key']}.{ext}")
                info.size = len(data)
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(data))
    storage.write_bytes_atomic(tar_url, buf.getvalue())
