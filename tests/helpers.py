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


def stock_pipeline_gap(pipeline: Path, prompt: str, guidance: float, steps: int, seed: int, tmp: Path):
    """`ldm generate`'s image and StableDiffusionPipeline's for the same prompt, seed, steps and guidance, loaded
    from an export with no network: (our image's shape, the largest per-pixel difference in 1/255)."""
    import numpy as np
    import torch
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    from ldm.train.export import generate

    ours = generate(str(pipeline), [prompt], guidance=guidance, steps=steps, seed=seed, out=str(tmp / "ours.png"))
    pipe = StableDiffusionPipeline.from_pretrained(pipeline, local_files_only=True)
    theirs = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance,
                  generator=torch.Generator().manual_seed(seed), output_type="np").images[0]  # fmt: skip
    a = np.asarray(Image.open(ours[0]), dtype=np.float64)
    assert a.shape == theirs.shape, (a.shape, theirs.shape)
    return a.shape, float(np.abs(a - theirs * 255.0).max())
