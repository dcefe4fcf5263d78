"""URL-list sources: the synthetic LAION-style world served on 127.0.0.1, or real parquet files."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ldm.config import ParquetSource, PipelineConfig, SyntheticSource
from ldm.io import storage
from ldm.synthetic import describe

# What each deliberately broken row must end as in the ingest summary.
EXPECTED_OUTCOME = {
    "http_404": "http_error",
    "connection_refused": "connection_error",
    "slow_response": "timeout",
    "not_an_image": "decode_error",
    "truncated_jpeg": "decode_error",
    "zero_bytes": "decode_error",
    "decompression_bomb": "decode_error",
    "duplicate_url": "duplicate_url",
    "empty_caption": "empty_caption",
    "invalid_utf8_caption": "invalid_caption",
    "opted_out": "opted_out",
}


@dataclass
class Source:
    """What ingest needs from a source: parquet URL-list paths, and the synthetic manifest if any."""

    paths: list[str]
    manifest: dict | None = None


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def synthetic_rows(cfg: SyntheticSource, base_url: str, refused_port: int) -> tuple[pa.Table, dict]:
    """The URL-list table (LAION column names, rows shuffled) and the source manifest."""
    n, b = cfg.num_samples, cfg.broken
    urls: list[str] = []
    texts: list[bytes | None] = []
    widths: list[int | None] = []
    heights: list[int | None] = []
    ratings: list[float | None] = []
    kinds: list[str] = []

    def add(url: str, text: bytes | None, spec=None, kind: str = "good") -> None:
        urls.append(url)
        texts.append(text)
        widths.append(spec.width if spec else None)
        heights.append(spec.height if spec else None)
        ratings.append(spec.rating if spec else None)
        kinds.append(kind)

    specs = [describe(cfg.seed, i, cfg.image_size) for i in range(n)]
    for s in specs:
        add(f"{base_url}/img/{s.index}.jpg", s.caption.encode(), s)
    extra = n  # renderable indices beyond the good ones, for broken rows that need a real image
    for kind, route in (
        ("empty_caption", "img"),
        ("invalid_utf8_caption", "img"),
        ("slow_response", "slow"),
        ("truncated_jpeg", "truncated"),
        ("opted_out", "noai"),
    ):
        for _ in range(getattr(b, kind)):
            s = describe(cfg.seed, extra, cfg.image_size)
            text = {"empty_caption": b"", "invalid_utf8_caption": b"a red \xff\xfe circle \xc3("}.get(
                kind, s.caption.encode()
            )
            add(f"{base_url}/{route}/{extra}.jpg", text, s, kind)
            extra += 1
    for kind, route, ext in (
        ("http_404", "missing", "jpg"),
        ("not_an_image", "html", "html"),
        ("zero_bytes", "empty", "jpg"),
        ("decompression_bomb", "bomb", "png"),
    ):
        for k in range(getattr(b, kind)):
            add(f"{base_url}/{route}/{k}.{ext}", f"broken row: {kind} {k}".encode(), None, kind)
    for k in range(b.connection_refused):
        add(
            f"http://127.0.0.1:{refused_port}/img/{k}.jpg",
            f"broken row: refused {k}".encode(),
            None,
            "connection_refused",
        )
    for k in range(b.duplicate_url):  # an exact duplicate of a good row, as web crawls have
        s = specs[(k * 7919) % n]
        add(f"{base_url}/img/{s.index}.jpg", s.caption.encode(), s, "duplicate_url")

    order = np.random.default_rng([cfg.seed, 7]).permutation(len(urls))
    text_arr = pa.array([texts[i] for i in order], type=pa.binary())
    # A string column whose bytes are not all UTF-8, as some real crawls ship: build it unvalidated.
    text_col = pa.Array.from_buffers(pa.string(), len(text_arr), text_arr.buffers(), text_arr.null_count)
    table = pa.table(
        {
            "URL": pa.array([urls[i] for i in order], type=pa.string()),
            "TEXT": text_col,
            "WIDTH": pa.array([widths[i] for i in order], type=pa.int64()),
            "HEIGHT": pa.array([heights[i] for i in order], type=pa.int64()),
            "rating": pa.array([ratings[i] for i in order], type=pa.float64()),
        }
    )
    broken = Counter(k for k in kinds if k != "good")
    expected = Counter({"success": n})
    for kind, count in broken.items():
        expected[EXPECTED_OUTCOME[kind]] += count
    manifest = {
        "kind": "synthetic",
        "seed": cfg.seed,
        "image_size": cfg.image_size,
        "rows": len(urls),
        "good_rows": n,
        "renderable": extra,
        "broken": dict(sorted(broken.items())),
        "expected_outcomes": dict(sorted(expected.items())),
        "mean_rating": round(float(np.mean([s.rating for s in specs])), 3),
    }
    return table, manifest


@contextlib.contextmanager
def serve_synthetic(cfg: SyntheticSource, slow_s: float) -> Iterator[str]:
    """Run the synthetic image server in its own process on 127.0.0.1; yield its base URL."""
    count = cfg.num_samples + sum(cfg.broken.model_dump().values())
    cmd = [
        sys.executable,
        "-m",
        "data_prep.sources.server",
        "--seed",
        str(cfg.seed),
        "--short-side",
        str(cfg.image_size),
        "--count",
        str(count),
        "--slow-s",
        str(slow_s),
        "--delay-ms",
        str(cfg.delay_ms),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        if not line.startswith("PORT "):
            raise RuntimeError(f"synthetic source server did not start (exit {proc.poll()})")
        base = f"http://127.0.0.1:{int(line.split()[1])}"
        deadline = time.monotonic() + 10
        while True:
            try:
                urllib.request.urlopen(base + "/healthz", timeout=1).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def open_source(cfg: PipelineConfig, folder: str) -> Iterator[Source]:
    """Make the profile's source available for ingest; the synthetic one is served while in use and its
    URL list written to `folder`."""
    if isinstance(cfg.source, ParquetSource):
        yield Source(paths=list(cfg.source.paths))
        return
    slow_s = cfg.ingest.timeout_s + 2.0
    with serve_synthetic(cfg.source, slow_s) as base:
        table, manifest = synthetic_rows(cfg.source, base, _closed_port())
        out = folder
        fs, path = storage.fs_for(out)
        fs.makedirs(path, exist_ok=True)
        with fs.open(f"{path}/urls.parquet", "wb") as f:
            pq.write_table(table, f)
        storage.write_json_atomic(storage.join(out, "manifest.json"), manifest)
        yield Source(paths=[storage.join(out, "urls.parquet")], manifest=manifest)
