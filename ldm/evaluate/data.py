"""The sweep's fixed prompt set, the held-out real images behind it, and their cached reference statistics."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ldm.config import PipelineConfig
from ldm.io import manifest, storage
from ldm.io.manifest import StageError
from ldm.io.shards import decode_rgb
from ldm.metrics.features import Extractor
from ldm.metrics.frechet import FeatureStats
from ldm.stage import Workdir
from ldm.synthetic import HELDOUT_START, SampleSpec, describe, render

HELDOUT_SPAN = 1_000_000  # prompts are drawn from this many held-out indices


@dataclass
class PromptSet:
    """Prompts with, when drawn from the synthetic world, the scenes they describe."""

    prompts: list[str]
    specs: list[SampleSpec] | None
    origin: dict


def prompt_set(cfg: PipelineConfig) -> PromptSet:
    """evaluate.prompt_count held-out captions (by evaluate.prompt_seed), or the lines of evaluate.prompts_file."""
    ev = cfg.evaluate
    if ev.prompts_file:
        path = Path(ev.prompts_file.removeprefix("file://")).expanduser()
        if not path.is_file():
            raise StageError(f"evaluate: prompt file {ev.prompts_file} does not exist (evaluate.prompts_file)")
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if len(lines) < 2:
            raise StageError(f"evaluate: prompt file {ev.prompts_file} holds {len(lines)} prompt(s); give 2 or more")
        return PromptSet(lines[: ev.prompt_count], None, {"file": str(path), "count": min(len(lines), ev.prompt_count)})
    if cfg.source.kind != "synthetic":
        raise StageError("evaluate: a parquet source has no held-out prompts; set evaluate.prompts_file")
    rng = np.random.default_rng(ev.prompt_seed)
    indices = sorted(HELDOUT_START + int(i) for i in rng.choice(HELDOUT_SPAN, ev.prompt_count, replace=False))
    specs = [describe(cfg.source.seed, i, cfg.source.image_size) for i in indices]
    origin = {"heldout": True, "count": ev.prompt_count, "seed": ev.prompt_seed, "source_seed": cfg.source.seed}
    return PromptSet([s.caption for s in specs], specs, origin)


def reference_specs(cfg: PipelineConfig, prompts: PromptSet) -> list[SampleSpec]:
    """The real held-out scenes FD compares against: the prompts' own scenes, or held-out ones for a prompt file."""
    if prompts.specs is not None:
        return prompts.specs
    if cfg.source.kind != "synthetic":
        raise StageError("evaluate: a parquet source has no held-out reference images for FD")
    n = len(prompts.prompts)
    return [describe(cfg.source.seed, HELDOUT_START + i, cfg.source.image_size) for i in range(n)]


def real_batches(cfg: PipelineConfig, specs: list[SampleSpec], batch: int) -> Iterator[np.ndarray]:
    """The held-out scenes rendered and resized like ingest does, one uint8 batch at a time (streamed)."""
    for i in range(0, len(specs), batch):
        chunk = specs[i : i + batch]
        yield np.stack([decode_rgb(render(s, cfg.source.seed), cfg.ingest.resolution) for s in chunk])


def cache_url(cfg: PipelineConfig, kind: str, key: str, ext: str) -> str:
    """Where a computed-once artefact lives: W/cache/<kind>/<key>.<ext>."""
    return Workdir.of(cfg).path("cache", kind, f"{key}.{ext}")


def reference_stats(cfg: PipelineConfig, specs: list[SampleSpec], extractor: Extractor) -> tuple[np.ndarray, ...]:
    """Mean and covariance of the real images' features: streamed once, then cached by content hash."""
    key = manifest.digest({
        "extractor": extractor.name, "weights": extractor.weights_hash, "resolution": cfg.ingest.resolution,
        "source_seed": cfg.source.seed, "image_size": getattr(cfg.source, "image_size", None),
        "indices": [s.index for s in specs],
    })  # fmt: skip
    url = cache_url(cfg, "fd-reference", key, "npz")
    if storage.exists(url):
        fs, path = storage.fs_for(url)
        with fs.open(path, "rb") as f:
            data = np.load(io.BytesIO(f.read()))
            return data["mu"], data["sigma"]
    stats = FeatureStats(extractor.dim)
    for images in real_batches(cfg, specs, cfg.evaluate.batch_size):
        stats.update(extractor(images))
    mu, sigma = stats.mean_cov()
    buf = io.BytesIO()
    np.savez(buf, mu=mu, sigma=sigma, n=stats.n)
    storage.write_bytes_atomic(url, buf.getvalue())
    return mu, sigma
