"""Config sections of the data stages: the source, ingest, filter and precompute."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ldm.config.base import KNOB, Section


class BrokenRows(Section):
    """How many deliberately broken rows of each kind the synthetic source mixes in."""

    http_404: int = Field(2, ge=0)
    connection_refused: int = Field(2, ge=0)
    slow_response: int = Field(1, ge=0)
    not_an_image: int = Field(2, ge=0)
    truncated_jpeg: int = Field(2, ge=0)
    zero_bytes: int = Field(2, ge=0)
    decompression_bomb: int = Field(1, ge=0)
    duplicate_url: int = Field(2, ge=0)
    empty_caption: int = Field(2, ge=0)
    invalid_utf8_caption: int = Field(2, ge=0)
    opted_out: int = Field(1, ge=0, description="good images served with `X-Robots-Tag: noai`")


class SyntheticSource(Section):
    """The embedded default's LAION-style world: rendered, captioned, rated images served on 127.0.0.1."""

    kind: Literal["synthetic"] = "synthetic"
    num_samples: int = Field(2000, ge=10, le=1_000_000, description="good rows (broken rows come on top)")
    seed: int = 0
    image_size: int = Field(96, ge=16, le=1024, description="short side of the rendered originals, px")
    broken: BrokenRows = BrokenRows()
    delay_ms: int = Field(0, ge=0, le=10_000, description="server-side delay per image, to simulate latency")


class ParquetSource(Section):
    """A real URL list: LAION / Re-LAION / DataComp metadata parquet files on any fsspec store."""

    kind: Literal["parquet"] = "parquet"
    paths: list[str] = Field(min_length=1, description="parquet files or folders of them (fsspec URLs)")


class Columns(Section):
    """Maps the source parquet's column names onto what ingest needs; extras travel into each sample's JSON."""

    url: str = "URL"
    caption: str = "TEXT"
    extra: list[str] = ["WIDTH", "HEIGHT", "rating", "similarity", "pwatermark", "punsafe"]


class IngestConfig(Section):
    """img2dataset download of the URL list into webdataset shards under W/raw/."""

    resolution: int = Field(64, ge=8, le=4096)
    resize_mode: Literal["center_crop", "keep_ratio", "border", "no"] = "center_crop"
    columns: Columns = Columns()
    url_policy: Literal["public", "loopback"] = Field(
        "public", description="public: only public unicast http(s) hosts; loopback: only 127.0.0.1"
    )
    samples_per_shard: int = Field(1000, ge=1)
    processes: int = Field(1, ge=1, json_schema_extra=KNOB)
    threads: int = Field(16, ge=1, json_schema_extra=KNOB)
    # Which rows succeed is decided by the network, not reproducibly by these two: a rerun with the same
    # values gets other transient failures. Each shard's outcomes are counted in its stats, so they are knobs
    # (raising the timeout to finish a resume must not throw finished shards away).
    timeout_s: float = Field(10.0, gt=0, json_schema_extra=KNOB)
    retries: int = Field(0, ge=0, le=10, json_schema_extra=KNOB)
    encode_quality: int = Field(95, ge=1, le=100)
    max_image_area: int = Field(40_000_000, ge=1, description="pixels; larger declared images are dropped")


class FilterConfig(Section):
    """Which raw samples reach W/filtered/: thresholds on the scores."""

    aesthetic_min: float = Field(5.0, ge=0, le=10)
    similarity_min: float = Field(0.0, ge=-1, le=1, description="CLIP image-text cosine; LAION-2B used 0.28 (B/32)")
    min_size: int = Field(0, ge=0, description="minimum original short side, px")
    pwatermark_max: float = Field(0.8, ge=0, le=1)
    punsafe_max: float = Field(0.5, ge=0, le=1)
    batch_size: int = Field(256, ge=1, json_schema_extra=KNOB)  # scores equal up to float rounding


class PrecomputeConfig(Section):
    """Ray Data precompute of VAE latents and text embeddings into W/latents/."""

    latent: Literal["mean", "sample"] = Field("mean", description="store the posterior mean, or a seeded sample")
    batch_size: int = Field(
        256, ge=1, description="rows per encoder call (CPU actors encode them 16 at a time)", json_schema_extra=KNOB
    )
    actors: int | None = Field(
        None, ge=1, description="encoder actors; None = one per CPU core (per GPU on GPUs)", json_schema_extra=KNOB
    )
    half: bool = Field(
        True, description="VAE in half precision: fp16 on a GPU, bf16 on a CPU with AMX or AVX512-BF16; else fp32"
    )
    object_store_mb: int = Field(
        512, ge=64, description="object store of a locally started Ray cluster", json_schema_extra=KNOB
    )
