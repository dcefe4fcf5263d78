"""Turn source URL-list parquet files into the exact list img2dataset downloads, one file at a time.

Each function here works on one input file and is run as a Ray task (data_prep/ingest/cluster.py); the
list-wide duplicate check between `clean_file` and `emit_shards` is dedupe.py's.

Columns are mapped by config; rows the metadata prefilter decides against (data_prep/ingest/prefilter.py)
are dropped first, so their hosts are never resolved; then unsafe URLs, bad captions and duplicate URLs.
All before any request is made; every dropped row is counted by reason (the first it fails).
"""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_prep.ingest import prefilter as pf
from data_prep.ingest.dedupe import digests, partition
from data_prep.ingest.url_guard import UrlGuard
from ldm.config import Columns
from ldm.config.data import Prefilter
from ldm.io import storage
from ldm.io.manifest import StageError

BATCH_ROWS = 500_000  # rows a cleaning task holds at once (LAION's files have ~18 M)


@dataclass
class InputFile:
    """One source parquet file with the columns found in it."""

    url: str
    rows: int
    extras: list[str]


@dataclass
class Cleaned:
    """What one file's cleaning kept (as candidates, before duplicates are known) and dropped, by reason."""

    candidates: int = 0
    dropped: Counter = field(default_factory=Counter)
    unjudged: Counter = field(default_factory=Counter)  # rows a prefilter check passed on a null value


def expand_inputs(paths: list[str]) -> list[str]:
    """Parquet file URLs named by paths: files as given, folders expanded to their *.parquet."""
    files: list[str] = []
    for p in paths:
        url = storage.normalize(p)
        fs, path = storage.fs_for(url)
        if fs.isdir(path):
            found = storage.listdir(url, "*.parquet")
            if not found:
                raise StageError(f"input folder {p} holds no .parquet files")
            files.extend(found)
        elif fs.exists(path):
            files.append(url)
        else:
            raise StageError(f"input file {p} does not exist")
    return files


def source_ids(cfg) -> dict[str, str]:
    """Content ids of a parquet source's files (size + ETag, or mtime where the store has none), by URL.

    Part of ingest's identity: img2dataset numbers shards by the sorted file listing, so an added, removed
    or changed file is another output; a synthetic source is defined by its config alone.
    """
    if cfg.source.kind != "parquet":
        return {}
    ids = {}
    for url in expand_inputs(cfg.source.paths):
        fs, path = storage.fs_for(url)
        info = fs.info(path)
        version = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
        ids[url] = f"{info.get('size')}-{version}".replace('"', "")
    return ids


def inspect_file(url: str, columns: Columns, prefilter: Prefilter) -> InputFile:
    """Read one input's schema; refuse a missing or mistyped URL/caption/prefilter column."""
    fs, path = storage.fs_for(url)
    try:
        with fs.open(path, "rb") as f:
            meta = pq.ParquetFile(f).metadata
            schema = meta.schema.to_arrow_schema()
    except (OSError, pa.ArrowInvalid) as e:
        raise StageError(f"{url} is not a readable parquet file: {e}") from e
    names = schema.names
    for role in ("url", "caption"):
        name = getattr(columns, role)
        if name not in names:
            raise StageError(
                f"{url} has no {role} column {name!r} (columns: {', '.join(names)}); "
                f"set ingest.columns.{role} to the right name"
            )
    url_type = schema.field(columns.url).type
    if not (pa.types.is_string(url_type) or pa.types.is_large_string(url_type)):
        raise StageError(f"{url}: URL column {columns.url!r} holds {url_type}, not strings; "
                         "set ingest.columns.url to the column of URLs")  # fmt: skip
    pf.check_schema(url, schema, prefilter, columns)
    return InputFile(url, meta.num_rows, [c for c in columns.extra if c in names])


def inspect_inputs(paths: list[str], columns: Columns, prefilter: Prefilter, threads: int = 16) -> list[InputFile]:
    """Every input's schema read (footers only, in parallel threads) and checked; an empty list refused.

    Here, not in Ray tasks: a footer is a few KB, and a bad list is refused before a cluster is started or
    anything is written; the first refusal in file order is raised.
    """
    files = expand_inputs(paths)
    with ThreadPoolExecutor(min(threads, max(1, len(files)))) as pool:
        inputs = list(pool.map(lambda u: inspect_file(u, columns, prefilter), files))
    if sum(i.rows for i in inputs) == 0:
        raise StageError(f"the URL list is empty: {', '.join(i.url for i in inputs) or 'no files'}")
    return inputs


def _caption(raw: bytes | None) -> tuple[str | None, str | None]:
    """(caption, reason): decode strictly as UTF-8 and refuse empty captions."""
    if raw is None:
        return None, "empty_caption"
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None, "invalid_caption"
    return (text, None) if text else (None, "empty_caption")


def clean_file(inp: InputFile, columns: Columns, prefilter: Prefilter, policy: str, extras: list[str],
               out_url: str, partitions: int) -> tuple[Cleaned, list[np.ndarray]]:  # fmt: skip
    """Write one input's candidate rows (url, caption, extras) to out_url; return the counts and, per digest
    partition, the candidates' (URL digest, position) pairs for the list-wide duplicate check (dedupe.py).

    Reads the file in batches, so memory is bounded by BATCH_ROWS, not by the file.
    """
    guard, result, hashes = UrlGuard(policy), Cleaned(), []
    wanted = list(dict.fromkeys([columns.url, columns.caption, *inp.extras, *pf.needed_columns(prefilter, columns)]))
    fs, path = storage.fs_for(inp.url)
    ofs, opath = storage.fs_for(out_url)
    ofs.makedirs(opath.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "rb") as f, ofs.open(opath, "wb") as out:
        source = pq.ParquetFile(f)
        schema = _candidate_schema(source.schema_arrow, inp, extras)
        with pq.ParquetWriter(out, schema) as writer:
            for batch in source.iter_batches(batch_size=BATCH_ROWS, columns=wanted):
                kept, urls = _clean_batch(pa.Table.from_batches([batch]), columns, prefilter, guard, result)
                n = kept.num_rows
                full = {f.name: kept.column(f.name) if f.name in kept.column_names else pa.nulls(n) for f in schema}
                writer.write_table(pa.table(full).cast(schema))
                hashes.append(digests(urls))
                result.candidates += kept.num_rows
    all_hashes = np.concatenate(hashes) if hashes else np.zeros(0, np.int64)
    return result, partition(all_hashes, partitions)


def _candidate_schema(source: pa.Schema, inp: InputFile, extras: list[str]) -> pa.Schema:
    """url, caption, then every extra of the whole list (null-typed where this file lacks it)."""
    fields = [pa.field("url", pa.string()), pa.field("caption", pa.string())]
    return pa.schema(fields + [pa.field(e, source.field(e).type if e in inp.extras else pa.null()) for e in extras])


def _clean_batch(table: pa.Table, columns: Columns, prefilter: Prefilter, guard: UrlGuard,
                 result: Cleaned) -> tuple[pa.Table, list[str]]:  # fmt: skip
    """One batch's candidate rows (url, caption, the file's extras) and their URLs; drops counted into result."""
    verdict, unjudged = pf.judge(table, prefilter, columns)  # before the guard: dropped rows are never resolved
    result.unjudged.update(unjudged)
    # Read captions as bytes: real crawls ship string columns holding invalid UTF-8.
    captions = table.column(columns.caption).cast(pa.binary()).to_pylist()
    urls = table.column(columns.url).to_pylist()
    guard.prefetch(u for u, v in zip(urls, verdict.tolist(), strict=True) if u and not v)
    keep: list[int] = []
    texts: list[str] = []
    for i, (url, raw, v) in enumerate(zip(urls, captions, verdict.tolist(), strict=True)):
        if v:
            result.dropped[pf.CHECKS[v - 1][1]] += 1
            continue
        reason = guard.check(url) if url else "bad_url"
        if reason and reason not in ("bad_url", "bad_scheme"):
            reason = f"blocked_{reason}"
        text = None
        if not reason:
            text, reason = _caption(raw)
        if not reason:
            reason = pf.caption_reason(text, prefilter)
        if reason:
            result.dropped[reason] += 1
            continue
        keep.append(i)
        texts.append(text)
    idx = pa.array(keep, type=pa.int64())
    cols = {"url": table.column(columns.url).take(idx), "caption": pa.array(texts, pa.string())}
    for e in columns.extra:
        if e in table.column_names:
            cols[e] = table.column(e).take(idx)
    return pa.table(cols), [urls[i] for i in keep]


def emit_shards(candidates_url: str, duplicates: list[np.ndarray], first_shard: int, samples_per_shard: int,
                skip: set[int], tmp_url: str) -> tuple[int, dict[int, str]]:  # fmt: skip
    """Drop one file's duplicate rows and cut the rest into img2dataset's input shards (Arrow files under tmp_url).

    Shards are numbered on from first_shard as img2dataset's own reader numbers them; those in skip (finished by
    an earlier run) are not written. Streams the file: memory is bounded by BATCH_ROWS. Returns (rows kept,
    {shard id: Arrow file URL}).
    """
    written: dict[int, str] = {}
    rows, pending = 0, []

    fs, path = storage.fs_for(candidates_url)
    with fs.open(path, "rb") as f:
        source = pq.ParquetFile(f)
        keep = np.ones(source.metadata.num_rows, dtype=bool)
        if duplicates:
            keep[np.concatenate(duplicates)] = False
        start = 0
        for batch in source.iter_batches(batch_size=BATCH_ROWS):
            part = pa.Table.from_batches([batch]).filter(pa.array(keep[start : start + batch.num_rows]))
            start += batch.num_rows
            pending.append(part)
            while sum(t.num_rows for t in pending) >= samples_per_shard:
                table = pa.concat_tables(pending)
                _write_shard(table.slice(0, samples_per_shard), first_shard + rows // samples_per_shard, skip,
                             tmp_url, written)  # fmt: skip
                rows += samples_per_shard
                pending = [table.slice(samples_per_shard)]
        rest = pa.concat_tables(pending) if pending else None
        if rest is not None and rest.num_rows:
            _write_shard(rest, first_shard + rows // samples_per_shard, skip, tmp_url, written)
            rows += rest.num_rows
    return rows, written


def _write_shard(table: pa.Table, shard: int, skip: set[int], tmp_url: str, written: dict[int, str]) -> None:
    """One input shard as an Arrow IPC file, as img2dataset's reader writes it; a finished shard is skipped."""
    if shard in skip:
        return
    url = storage.join(tmp_url, f"{shard}.feather")
    fs, path = storage.fs_for(url)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "wb") as out, pa.ipc.new_file(out, table.schema) as writer:
        writer.write_table(table)
    written[shard] = url
