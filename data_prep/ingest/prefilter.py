"""The metadata prefilter: drop URL-list rows on what the list's own columns say, before any request.

LAION's parquet files carry each image's original size, punsafe, pwatermark, the CLIP similarity the list
was built with, and (LAION-Aesthetics, laion2B-multi) an aesthetic score and a language code. A row these
decide against is never resolved or fetched: at LAION scale that is most of the thresholds' saving. The
image filter (data_prep/filter) keeps scoring what only the images can tell.

Rules (`ldm.config.data.Prefilter`): a threshold set to None is no check; a set one needs its column
(mapped by `ingest.columns`) in every input file, or ingest refuses to start, naming the column and the
file. `_min` drops a value below it, `_max` a value above it: a value equal to the threshold is kept, the
comparison made in the column's own type (float32 punsafe 0.5 against float32(0.5)). `min_size` drops
rows whose min(width, height) is below it. A null (or NaN) value cannot be judged and passes, as the
image filter passes a sample without the field; a width or height of 0 or less is read as unknown too
(laion2B-multi fills unknown sizes with 0). Rows that passed a check unjudged are counted by threshold.
A row failing several checks is counted once, under the first in CHECKS order.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ldm.config import Columns
from ldm.config.data import Prefilter
from ldm.io.manifest import StageError

# (threshold, reason counted for a dropped row, the Columns roles it reads), in the order rows are judged.
CHECKS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("min_size", "too_small", ("width", "height")),
    ("punsafe_max", "unsafe", ("punsafe",)),
    ("pwatermark_max", "watermark", ("pwatermark",)),
    ("similarity_min", "low_similarity", ("similarity",)),
    ("aesthetic_min", "low_aesthetic", ("aesthetic",)),
    ("languages", "other_language", ("language",)),
)
REASONS = tuple(reason for _, reason, _ in CHECKS) + ("caption_too_short", "caption_too_long")


def active(prefilter: Prefilter) -> list[tuple[int, str, object, tuple[str, ...]]]:
    """The set thresholds: (reason index, threshold name, value, Columns roles), in CHECKS order."""
    return [(k, t, getattr(prefilter, t), roles) for k, (t, _, roles) in enumerate(CHECKS, start=1)
            if getattr(prefilter, t) is not None]  # fmt: skip


def needed_columns(prefilter: Prefilter, columns: Columns) -> list[str]:
    """The list's column names the set thresholds read."""
    return list(dict.fromkeys(getattr(columns, r) for _, _, _, roles in active(prefilter) for r in roles))


def check_schema(url: str, schema: pa.Schema, prefilter: Prefilter, columns: Columns) -> None:
    """Refuse a file lacking a column a set threshold needs, or holding it in a type the check cannot compare."""
    for _, threshold, _, roles in active(prefilter):
        for role in roles:
            name = getattr(columns, role)
            fix = f"set ingest.columns.{role} to its name in the list, or unset ingest.prefilter.{threshold}"
            if name not in schema.names:
                raise StageError(
                    f"{url} has no column {name!r}, which ingest.prefilter.{threshold} needs "
                    f"(columns: {', '.join(schema.names)}); {fix}"
                )
            kind = schema.field(name).type
            text = pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_dictionary(kind)
            numeric = pa.types.is_integer(kind) or pa.types.is_floating(kind)
            if not (text if threshold == "languages" else numeric):
                want = "strings" if threshold == "languages" else "numbers"
                raise StageError(
                    f"{url}: column {name!r} for ingest.prefilter.{threshold} holds {kind}, not {want}; {fix}"
                )


def _compare(column: pa.ChunkedArray, op: str, threshold: float) -> np.ndarray:
    """column <op> threshold in the column's own type where it is floating (else as float64); null -> False."""
    if pa.types.is_floating(column.type):
        scalar = pa.scalar(threshold, column.type)
    else:
        column, scalar = pc.cast(column, pa.float64()), pa.scalar(float(threshold), pa.float64())
    return pc.fill_null(getattr(pc, op)(column, scalar), False).to_numpy(zero_copy_only=False)


def _unknown(column: pa.ChunkedArray) -> np.ndarray:
    return pc.is_null(column, nan_is_null=True).to_numpy(zero_copy_only=False)


def judge(table: pa.Table, prefilter: Prefilter, columns: Columns) -> tuple[np.ndarray, Counter]:
    """(reason index per row: 0 keeps, k drops for CHECKS[k - 1]; rows kept unjudged, by threshold)."""
    verdict = np.zeros(table.num_rows, dtype=np.int8)
    unjudged: list[tuple[str, np.ndarray]] = []
    for k, threshold, value, roles in active(prefilter):
        cols = [table.column(getattr(columns, r)) for r in roles]
        unknown = np.logical_or.reduce([_unknown(c) for c in cols])
        if threshold == "min_size":  # a size of 0 or less is unknown too (laion2B-multi fills unknowns with 0)
            unknown |= np.logical_or.reduce([_compare(c, "less_equal", 0) for c in cols])
            fail = np.logical_or.reduce([_compare(c, "less", value) for c in cols])
        elif threshold == "languages":
            lang = pc.cast(cols[0], pa.string()) if pa.types.is_dictionary(cols[0].type) else cols[0]
            fail = ~pc.is_in(lang, value_set=pa.array(value, pa.string())).to_numpy(zero_copy_only=False)
        else:
            fail = _compare(cols[0], "greater" if threshold.endswith("_max") else "less", value)
        verdict[(verdict == 0) & fail & ~unknown] = k
        unjudged.append((threshold, unknown))
    kept = verdict == 0
    counts = Counter({t: int((u & kept).sum()) for t, u in unjudged if (u & kept).any()})
    return verdict, counts


def caption_reason(text: str, prefilter: Prefilter) -> str | None:
    """caption_too_short / caption_too_long for a decoded, stripped caption, or None."""
    if prefilter.caption_min_chars is not None and len(text) < prefilter.caption_min_chars:
        return "caption_too_short"
    if prefilter.caption_max_chars is not None and len(text) > prefilter.caption_max_chars:
        return "caption_too_long"
    return None
