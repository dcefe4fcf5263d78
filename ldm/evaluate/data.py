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
from ldm.io.shards import decode_rgb, iter_samples, shard_urls
from ldm.metrics.features import Extractor
from ldm.metrics.frechet import FeatureStats
from ldm.stage import Workdir
from ldm.synthetic import HELDOUT_START, SampleSpec, describe, render

HELDOUT_SPAN = 1_000_000  # prompts are drawn from this many held-out indices
UNFAITHFUL = "bad_crop"  # the degradation whose scenes' pictures contradict their captions


@dataclass
class PromptSet:
    """Prompts with, when drawn from the synthetic world, the scenes they describe."""

    prompts: list[str]
    specs: list[SampleSpec] | None
    origin: dict


def reference_samples(url: str, count: int) -> Iterator[tuple[bytes, str]]:
    """The first `count` (jpg bytes, caption) pairs of a folder of webdataset shards, in shard order (streamed)."""
    tars = shard_urls(url)
    if not tars:
        raise StageError(f"evaluate: evaluate.reference {url} holds no webdataset shards (*.tar)")
    n = 0
    for tar in tars:
        for s in iter_samples(tar):
            if "jpg" not in s or "txt" not in s:
                raise StageError(
                    f"evaluate: sample {s.get('key')!r} in {tar} lacks a .jpg or .txt (evaluate.reference)"
                )
            yield s["jpg"], s["txt"]
            n += 1
            if n == count:
                return
    raise StageError(f"evaluate: evaluate.reference {url} holds {n} samples, evaluate.prompt_count asks for {count}")


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
    if ev.reference:  # real held-out images with captions (prod: e.g. COCO-2014 val as webdataset shards)
        captions = [caption for _, caption in reference_samples(ev.reference, ev.prompt_count)]
        return PromptSet(captions, None, {"reference": ev.reference, "count": ev.prompt_count})
    if cfg.source.kind != "synthetic":
        raise StageError("evaluate: a parquet source has no held-out prompts; set evaluate.reference")
    # Held-out scenes from the distribution the UNet learned (the filter keeps ratings >= aesthetic_min),
    # less those whose picture does not show what their caption names: a bad_crop scene moves its object
    # off the named position or out of the frame, so its own render fails its prompt. One in six scenes
    # rated >= 6 is one; the judge read them at colour 0.50 / shape 0.36, the others at 1.00 / 0.93.
    floor = cfg.filter.aesthetic_min
    rng = np.random.default_rng(ev.prompt_seed)
    specs = []
    for i in rng.choice(HELDOUT_SPAN, min(HELDOUT_SPAN, 8 * ev.prompt_count), replace=False):
        spec = describe(cfg.source.seed, HELDOUT_START + int(i), cfg.source.image_size)
        if spec.rating >= floor and UNFAITHFUL not in spec.degradations:
            specs.append(spec)
            if len(specs) == ev.prompt_count:
                break
    else:
        raise StageError(
            f"evaluate: too few held-out scenes rated >= {floor} (filter.aesthetic_min) for "
            f"{ev.prompt_count} prompts (evaluate.prompt_count); lower one of them"
        )
    specs.sort(key=lambda s: s.index)
    origin = {"heldout": True, "count": ev.prompt_count, "seed": ev.prompt_seed, "source_seed": cfg.source.seed,
              "min_rating": floor, "without": UNFAITHFUL}  # fmt: skip
    return PromptSet([s.caption for s in specs], specs, origin)


@dataclass
class Reference:
    """The real images FD compares against: held-out synthetic scenes, or evaluate.reference's shards."""

    key: dict  # what identifies the set, for the statistics cache
    specs: list[SampleSpec] | None = None
    url: str | None = None
    count: int = 0

    def batches(self, cfg: PipelineConfig, batch: int) -> Iterator[np.ndarray]:
        """The images resized like ingest does, one uint8 batch at a time (streamed)."""
        if self.specs is not None:
            yield from real_batches(cfg, self.specs, batch)
            return
        chunk: list[np.ndarray] = []
        for jpg, _ in reference_samples(str(self.url), self.count):
            chunk.append(decode_rgb(jpg, cfg.ingest.resolution))
            if len(chunk) == batch:
                yield np.stack(chunk)
                chunk = []
        if chunk:
            yield np.stack(chunk)


def reference(cfg: PipelineConfig, prompts: PromptSet) -> Reference:
    """The real images for FD: the prompts' own scenes, held-out scenes for a prompt file, or evaluate.reference."""
    n = len(prompts.prompts)
    if cfg.evaluate.reference:
        return Reference({"reference": cfg.evaluate.reference, "count": n}, url=cfg.evaluate.reference, count=n)
    if cfg.source.kind != "synthetic":
        raise StageError("evaluate: a parquet source has no held-out reference images; set evaluate.reference")
    specs = prompts.specs or [describe(cfg.source.seed, HELDOUT_START + i, cfg.source.image_size) for i in range(n)]
    key = {"source_seed": cfg.source.seed, "image_size": cfg.source.image_size, "indices": [s.index for s in specs]}
    return Reference(key, specs=specs)


def real_batches(cfg: PipelineConfig, specs: list[SampleSpec], batch: int) -> Iterator[np.ndarray]:
    """The held-out scenes rendered and resized like ingest does, one uint8 batch at a time (streamed)."""
    for i in range(0, len(specs), batch):
        chunk = specs[i : i + batch]
        yield np.stack([decode_rgb(render(s, cfg.source.seed), cfg.ingest.resolution) for s in chunk])


def cache_url(cfg: PipelineConfig, kind: str, key: str, ext: str) -> str:
    """Where a computed-once artefact lives: W/cache/<kind>/<key>.<ext>."""
    return Workdir.of(cfg).path("cache", kind, f"{key}.{ext}")


def reference_stats(cfg: PipelineConfig, ref: Reference, extractor: Extractor) -> tuple[np.ndarray, ...]:
    """Mean and covariance of the real images' features: streamed once, then cached by what identifies them."""
    key = manifest.digest(
        {"extractor": extractor.name, "weights": extractor.weights_hash, "resolution": cfg.ingest.resolution, **ref.key}
    )
    url = cache_url(cfg, "fd-reference", key, "npz")
    if storage.exists(url):
        fs, path = storage.fs_for(url)
        with fs.open(path, "rb") as f:
            data = np.load(io.BytesIO(f.read()))
            return data["mu"], data["sigma"]
    stats = FeatureStats(extractor.dim)
    for images in ref.batches(cfg, cfg.evaluate.batch_size):
        stats.update(extractor(images))
    mu, sigma = stats.mean_cov()
    buf = io.BytesIO()
    np.savez(buf, mu=mu, sigma=sigma, n=stats.n)
    storage.write_bytes_atomic(url, buf.getvalue())
    return mu, sigma
