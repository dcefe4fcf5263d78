"""Turn source URL-list parquet files into the exact list img2dataset downloads.

Columns are mapped by config, captions decoded and checked, duplicate URLs and unsafe URLs dropped
before any request is made; every dropped row is counted by reason.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from data_prep.ingest.dedupe import SeenUrls
from data_prep.ingest.url_guard import UrlGuard
from ldm.config import Columns
from ldm.io import storage
from ldm.io.manifest import StageError


@dataclass
class InputFile:
    """One source parquet file with the columns found in it."""

    url: str
    rows: int
    extras: list[str]


@dataclass
class Prepared:
    """The download list: its files, rows per file, and the rows dropped before download by reason."""

    files: list[str] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)
    extras: list[str] = field(default_factory=list)


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


def inspect_inputs(paths: list[str], columns: Columns) -> list[InputFile]:
    """Read every input's schema; refuse a missing URL/caption column or an empty list before any write."""
    inputs = []
    for url in expand_inputs(paths):
        fs, path = storage.fs_for(url)
        try:
            with fs.open(path, "rb") as f:
                meta = pq.ParquetFile(f).metadata
                names = meta.schema.to_arrow_schema().names
        except (OSError, pa.ArrowInvalid) as e:
            raise StageError(f"{url} is not a readable parquet file: {e}") from e
        for role in ("url", "caption"):
            name = getattr(columns, role)
            if name not in names:
                raise StageError(
                    f"{url} has no {role} column {name!r} (columns: {', '.join(names)}); "
                    f"set ingest.columns.{role} to the right name"
                )
        url_type = meta.schema.to_arrow_schema().field(columns.url).type
        if not (pa.types.is_string(url_type) or pa.types.is_large_string(url_type)):
            raise StageError(f"{url}: URL column {columns.url!r} holds {url_type}, not strings; "
                             "set ingest.columns.url to the column of URLs")  # fmt: skip
        inputs.append(InputFile(url, meta.num_rows, [c for c in columns.extra if c in names]))
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


def prepare(inputs: list[InputFile], columns: Columns, guard: UrlGuard, out_url: str) -> Prepared:
    """Write one cleaned parquet per input under out_url; return what was kept and dropped."""
    with tempfile.TemporaryDirectory() as tmp:
        seen = SeenUrls(os.path.join(tmp, "seen.sqlite"))  # exact duplicates across the whole list
        try:
            return _prepare(inputs, columns, guard, out_url, seen)
        finally:
            seen.close()


def _prepare(inputs: list[InputFile], columns: Columns, guard: UrlGuard, out_url: str, seen: SeenUrls) -> Prepared:
    result = Prepared(extras=sorted({e for i in inputs for e in i.extras}, key=columns.extra.index))
    for n, inp in enumerate(inputs):
        fs, path = storage.fs_for(inp.url)
        with fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=[columns.url, columns.caption, *inp.extras])
        # Read captions as bytes: real crawls ship string columns holding invalid UTF-8.
        captions = table.column(columns.caption).cast(pa.binary()).to_pylist()
        urls = table.column(columns.url).to_pylist()
        guard.prefetch(u for u in urls if u)
        candidates: list[int] = []
        texts: list[str] = []
        for i, (url, raw) in enumerate(zip(urls, captions, strict=True)):
            reason = guard.check(url) if url else "bad_url"
            if reason and reason not in ("bad_url", "bad_scheme"):
                reason = f"blocked_{reason}"
            text = None
            if not reason:
                text, reason = _caption(raw)
            if reason:
                result.dropped[reason] += 1
                continue
            candidates.append(i)
            texts.append(text)
        first = seen.first_seen([urls[i] for i in candidates])
        if (~first).any():
            result.dropped["duplicate_url"] += int((~first).sum())
        keep = [i for i, new in zip(candidates, first, strict=True) if new]
        clean_captions = [t for t, new in zip(texts, first, strict=True) if new]
        idx = pa.array(keep, type=pa.int64())
        cols = {"url": table.column(columns.url).take(idx), "caption": pa.array(clean_captions, pa.string())}
        for e in result.extras:
            cols[e] = table.column(e).take(idx) if e in inp.extras else pa.nulls(len(keep))
        name = storage.join(out_url, f"{n:05d}.parquet")
        ofs, opath = storage.fs_for(name)
        ofs.makedirs(opath.rsplit("/", 1)[0], exist_ok=True)
        with ofs.open(opath, "wb") as f:
            pq.write_table(pa.table(cols), f)
        result.files.append(name)
        result.rows.append(len(keep))
    return result
