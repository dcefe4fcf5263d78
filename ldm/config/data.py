"""Config sections of the data stages: the source, ingest, filter and precompute."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

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
    """Maps the source parquet's column names onto what ingest needs; extras travel into each sample's JSON.

    The metadata columns (width ... language) are read only where an `ingest.prefilter` threshold needs them;
    the defaults are LAION's names (relaion2B-en has no AESTHETIC_SCORE or LANGUAGE; LAION-Aesthetics and
    laion2B-multi have them).
    """

    url: str = "URL"
    caption: str = "TEXT"
    extra: list[str] = ["WIDTH", "HEIGHT", "rating", "similarity", "pwatermark", "punsafe"]
    width: str = Field("WIDTH", description="the original image's width, px")
    height: str = Field("HEIGHT", description="the original image's height, px")
    punsafe: str = Field("punsafe", description="probability the image is unsafe (LAION's NSFW detector)")
    pwatermark: str = Field("pwatermark", description="probability the image carries a watermark")
    similarity: str = Field("similarity", description="CLIP image-text cosine the list was built with")
    aesthetic: str = Field("AESTHETIC_SCORE", description="LAION aesthetic predictor score, 0-10")
    language: str = Field("LANGUAGE", description="caption language code (laion2B-multi)")


class Prefilter(Section):
    """Thresholds on the URL list's own metadata: rows failing one are dropped before any request is made.

    None = no check. Each threshold needs its column (`ingest.columns`) in every input file, or ingest refuses
    to start. Comparisons: a `_min` drops values below it, a `_max` values above it (a value equal to the
    threshold is kept); `min_size` drops min(width, height) below it; `languages` keeps the codes it lists. A
    null value passes (the list does not know it) and is counted in the manifest's `prefilter_unknown`.
    """

    min_size: int | None = Field(None, ge=0, description="minimum original short side, px (too_small)")
    punsafe_max: float | None = Field(None, ge=0, le=1, description="unsafe")
    pwatermark_max: float | None = Field(None, ge=0, le=1, description="watermark")
    similarity_min: float | None = Field(None, ge=-1, le=1, description="low_similarity")
    aesthetic_min: float | None = Field(None, ge=0, le=10, description="low_aesthetic")
    languages: list[str] | None = Field(None, min_length=1, description="language codes kept (other_language)")
    caption_min_chars: int | None = Field(None, ge=1, description="caption_too_short (after stripping spaces)")
    caption_max_chars: int | None = Field(None, ge=1, description="caption_too_long")

    @model_validator(mode="after")
    def _caption_bounds(self) -> Prefilter:
        lo, hi = self.caption_min_chars, self.caption_max_chars
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"caption_min_chars {lo} > caption_max_chars {hi}: every caption would be dropped")
        return self


class IngestConfig(Section):
    """img2dataset download of the URL list into webdataset shards under W/raw/."""

    resolution: int = Field(64, ge=8, le=4096)
    resize_mode: Literal["center_crop", "keep_ratio", "border", "no"] = "center_crop"
    columns: Columns = Columns()
    prefilter: Prefilter = Prefilter()
    url_policy: Literal["public", "loopback"] = Field(
        "public", description="public: only public unicast http(s) hosts; loopback: only 127.0.0.1"
    )
    samples_per_shard: int = Field(1000, ge=1)
    processes: int = Field(
        1, ge=1, description="shards downloading at once (Ray tasks of 1 CPU each, over the cluster)",
        json_schema_extra=KNOB,
    )  # fmt: skip
    threads: int = Field(16, ge=1, description="download threads per shard", json_schema_extra=KNOB)
    shard_retries: int = Field(
        3, ge=0, le=20, description="tries again for a shard whose task failed or whose node died",
        json_schema_extra=KNOB,
    )  # fmt: skip
    # Which rows succeed is decided by the network, not reproducibly by these two: a rerun with the same
    # values gets other transient failures. Each shard's outcomes are counted in its stats, so they are knobs
    # (raising the timeout to finish a resume must not throw finished shards away).
    timeout_s: float = Field(10.0, gt=0, json_schema_extra=KNOB)
    retries: int = Field(0, ge=0, le=10, json_schema_extra=KNOB)
    encode_quality: int = Field(95, ge=1, le=100)
    max_image_area: int = Field(40_000_000, ge=1, description="pixels; larger declared images are dropped")


class FilterConfig(Section):
    """Which raw samples reach W/filtered/: thresholds on the scores only the images give (CLIP on the pixels).

    What the URL list's metadata decides (size, punsafe, pwatermark, the list's own similarity and
    aesthetic columns) is ingest.prefilter's: those rows are dropped before any download.
    """

    aesthetic_min: float = Field(5.0, ge=0, le=10)
    similarity_min: float = Field(0.0, ge=-1, le=1, description="CLIP image-text cosine; LAION-2B used 0.28 (B/32)")
    batch_size: int = Field(256, ge=1, json_schema_extra=KNOB)  # scores equal up to float rounding
    actors: int | None = Field(
        None, ge=1, description="scorer actors; None = one per CPU core (per GPU on GPUs)", json_schema_extra=KNOB
    )


class PrecomputeConfig(Section):
    """Ray Data precompute of VAE latents and text embeddings into W/latents/."""

    latent: Literal["mean", "sample"] = Field("mean", description="store the posterior mean, or a seeded sample")
    resolution: int | None = Field(
        None, ge=8, le=4096,
        description="px of the square images encoded; None: ingest.resolution. A lower one makes a training phase "
        "at that resolution from the same download (latents under W/latents-<px>px/)",
    )  # fmt: skip
    crop: Literal["center", "random"] = Field(
        "center",
        description="the square taken from a non-square image after its short side is resized: the centre, or "
        "a position drawn once per sample from its key and the seed (SD's random crop, fixed in the latents)",
    )
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
