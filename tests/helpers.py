"""Helpers shared by the tests."""

from __future__ import annotations

import socket
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.parquet as pq

from ldm.config import PipelineConfig, load_config
from ldm.io import storage
from ldm.io.shards import iter_samples


def make_config(workdir: Path | str, *overrides: str) -> PipelineConfig:
    """The test profile with its outputs under workdir."""
    return load_config("test", list(overrides), str(workdir))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raw_samples(workdir: str) -> list[dict]:
    """Every sample in W/raw/shards, in shard order."""
    shards = storage.listdir(storage.join(storage.normalize(workdir), "raw", "shards"), "*.tar")
    return [s for tar in shards for s in iter_samples(tar)]


def source_rows(workdir: str) -> dict[str, dict]:
    """The synthetic source's rows by URL path (ports differ between runs; paths do not)."""
    fs, path = storage.fs_for(storage.join(storage.normalize(workdir), "source", "urls.parquet"))
    with fs.open(path, "rb") as f:
        rows = pq.read_table(f, columns=["URL", "WIDTH", "HEIGHT", "rating"]).to_pylist()
    return {urlsplit(r["URL"]).path: r for r in rows}
