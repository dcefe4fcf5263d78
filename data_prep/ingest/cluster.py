"""Ingest's work as Ray tasks: preparation per input file, then img2dataset's downloader per shard.

The same code runs on a prod cluster (tasks spread over its CPU nodes) and on the local Ray instance that
`ldm.ray_cluster.ensure_ray` starts for the local and test profiles.

Why img2dataset's `Downloader` under tasks of ours, not its `distributor="ray"`: in img2dataset 1.47
(distributor.py) that distributor submits one task per input shard, all at once, then `ray.get`s them all:
no retry (`max_shard_retry` is ignored), no bound on the tasks in flight, and its reader first writes every
input shard as an Arrow file from the driver, which reads the whole URL list. Here:

- preparation is three task kinds, none of which returns rows to the driver: `_clean` per input file
  (metadata prefilter, URL guard with its DNS lookups, captions; writes the file's candidate rows and returns
  counts plus its URL digests split into partitions), `_dedupe` per digest partition (first occurrence in
  list order wins, dedupe.py), `_emit` per file (drops the duplicates, cuts img2dataset's input shards);
- each shard is one `_download` task running `GuardedDownloader.download` (the URL guard installed inside
  the worker, fetch.py), retried by Ray when its worker or node dies (`max_retries`) or it raises
  (`retry_exceptions`); it writes into its own attempt folder and publishes the tar, the parquet and, last,
  the `_stats.json` into W/raw/shards, so a retry never writes into a file an orphaned attempt still writes,
  and a shard counts as finished exactly when its stats file exists (resume skips those);
- at most `ingest.processes` shards are in flight (`ray.wait` on a window), and the progress bar advances
  by each shard's row count as its task returns.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import io
import math
import os
import tempfile
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import ray

from data_prep.ingest.dedupe import first_across
from data_prep.ingest.fetch import GuardedDownloader
from data_prep.ingest.outcomes import OOM_SHARD_COUNT
from data_prep.ingest.prepare import Cleaned, InputFile, clean_file, emit_shards
from ldm.config import IngestConfig
from ldm.io import storage
from ldm.io.manifest import StageError, root_cause

PARTITION_ROWS = 20_000_000  # rows per dedupe partition (an on-disk digest set each: memory stays flat)
LOG_CHARS = 20_000  # a shard's captured chatter kept for the stage log
TASK = {"num_cpus": 1, "scheduling_strategy": "SPREAD", "max_retries": 3}


def _get(refs):
    """ray.get that raises a task's own error (a StageError naming the file), not Ray's wrapper with its trace."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        raise root_cause(e) from None


@ray.remote
def _clean(inp, columns, prefilter, policy, extras, out_url, partitions) -> tuple:
    cleaned, parts = clean_file(inp, columns, prefilter, policy, extras, out_url, partitions)
    return (cleaned, *parts)


@ray.remote
def _dedupe(*parts: np.ndarray) -> tuple:
    with tempfile.TemporaryDirectory() as tmp:  # the worker's local disk: the digest set's home
        dups = first_across(parts, os.path.join(tmp, "seen.sqlite"))
    return (np.array([len(d) for d in dups], dtype=np.int64), *dups)


@ray.remote
def _emit(candidates_url, first_shard, samples_per_shard, skip, tmp_url, *duplicates) -> tuple[int, dict]:
    return emit_shards(candidates_url, list(duplicates), first_shard, samples_per_shard, skip, tmp_url)


@dataclass
class Plan:
    """The prepared list: rows per file, the rows dropped before download, and the shards left to download."""

    rows: list[int] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)
    unjudged: Counter = field(default_factory=Counter)
    shard_rows: dict[int, int] = field(default_factory=dict)  # every shard of the list: its row count
    todo: dict[int, str] = field(default_factory=dict)  # shards to download: their input Arrow file


def prepare_all(inputs: list[InputFile], ic: IngestConfig, prepared_url: str, tmp_url: str, done: set[int]) -> Plan:
    """Clean, deduplicate and cut the list into shards, as tasks; the driver holds counts and references only."""
    extras = [e for e in ic.columns.extra if any(e in i.extras for i in inputs)]
    partitions = max(1, min(256, math.ceil(sum(i.rows for i in inputs) / PARTITION_ROWS)))
    cand_urls = [storage.join(prepared_url, f"{n:05d}.parquet") for n in range(len(inputs))]
    cleaned_refs = [
        _clean.options(**TASK, num_returns=1 + partitions).remote(
            inp, ic.columns, ic.prefilter, ic.url_policy, extras, url, partitions
        )
        for inp, url in zip(inputs, cand_urls, strict=True)
    ]
    dedupe_refs = [
        _dedupe.options(**TASK, num_returns=1 + len(inputs)).remote(*(refs[1 + p] for refs in cleaned_refs))
        for p in range(partitions)
    ]
    cleaned: list[Cleaned] = _get([refs[0] for refs in cleaned_refs])
    dup_counts = np.sum(_get([refs[0] for refs in dedupe_refs]), axis=0)
    plan = Plan()
    for c in cleaned:
        plan.dropped.update(c.dropped)
        plan.unjudged.update(c.unjudged)
    plan.dropped["duplicate_url"] += int(dup_counts.sum())
    plan.dropped = +plan.dropped  # no zero counts
    plan.rows = [c.candidates - int(d) for c, d in zip(cleaned, dup_counts, strict=True)]
    first, sps, emits = 0, ic.samples_per_shard, []
    for n, rows in enumerate(plan.rows):
        shards = range(first, first + math.ceil(rows / sps))
        for k, shard in enumerate(shards):
            plan.shard_rows[shard] = min(sps, rows - k * sps)
        if any(s not in done for s in shards):
            skip = {s for s in shards if s in done}
            dups = [refs[1 + n] for refs in dedupe_refs]
            emits.append((n, _emit.options(**TASK).remote(cand_urls[n], first, sps, skip, tmp_url, *dups)))
        first = shards.stop
    for (n, _), (rows, written) in zip(emits, _get([ref for _, ref in emits]), strict=True):
        if rows != plan.rows[n]:  # the candidates file changed under us (a second writer on this output?)
            raise StageError(f"{cand_urls[n]}: {rows} rows after dedupe, {plan.rows[n]} expected; rerun")
        plan.todo.update(written)
    return plan


def _node_alive() -> bool:
    """Whether this worker's raylet still runs. A worker outlives a SIGKILLed raylet by up to a second (it
    checks on its own, and runs in its own process group); an attempt that finds its node dead must not
    publish: its task is retried elsewhere, and on the local profile the image server died with the driver."""
    raylet = os.environ.get("RAY_RAYLET_PID")
    return raylet is None or os.getppid() == int(raylet)


@ray.remote
def _download(downloader: GuardedDownloader, shard: int, arrow_url: str, shards_url: str) -> dict:
    name, node = f"{shard:0{OOM_SHARD_COUNT}d}", ray.get_runtime_context().get_node_id()
    stats_url = storage.join(shards_url, f"{name}_stats.json")
    if storage.exists(stats_url):  # an earlier attempt finished and published, then its worker died
        return {"shard": shard, "stats": storage.read_json(stats_url), "log": "", "node": node}
    # An attempt's folder names its shard and node: a stage killed mid-way leaves them for a look.
    attempt = storage.join(shards_url, "_attempts", f"{name}-{node[:12]}-{uuid.uuid4().hex[:8]}")
    fs, attempt_path = storage.fs_for(attempt)
    fs.makedirs(attempt_path, exist_ok=True)
    own_input = storage.join(attempt, "input.feather")  # the Downloader deletes its input when it is done
    fs.copy(storage.fs_for(arrow_url)[1], storage.fs_for(own_input)[1])
    dl = copy.copy(downloader)
    dl.output_folder = attempt
    chatter = io.StringIO()
    with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
        dl.download((shard, own_input))
    if not _node_alive():
        raise RuntimeError(f"shard {name}: this worker's node died during the download; not published")
    _, shards_path = storage.fs_for(shards_url)
    for suffix in (".tar", ".parquet", "_stats.json"):  # the stats file last: it marks the shard finished
        fs.mv(f"{attempt_path}/{name}{suffix}", f"{shards_path}/{name}{suffix}")
    with contextlib.suppress(FileNotFoundError):  # on S3 a prefix whose objects all moved no longer exists
        fs.rm(attempt_path, recursive=True)
    return {"shard": shard, "stats": storage.read_json(stats_url), "log": chatter.getvalue()[-LOG_CHARS:], "node": node}


def download_all(plan: Plan, downloader: GuardedDownloader, shards_url: str, window: int, retries: int,
                 on_done: Callable[[dict], None]) -> list[str]:  # fmt: skip
    """Download the plan's shards as tasks, at most `window` in flight; on_done(result) as each returns.

    Returns the errors of shards that failed past their retries (their shards stay unfinished, for a rerun).
    """
    options = {**TASK, "max_retries": retries, "retry_exceptions": True}
    dl = ray.put(downloader)
    queue = collections.deque(sorted(plan.todo.items()))
    pending: dict = {}
    errors: list[str] = []
    while queue or pending:
        while queue and len(pending) < window:
            shard, url = queue.popleft()
            pending[_download.options(**options).remote(dl, shard, url, shards_url)] = shard
        ready, _ = ray.wait(list(pending), num_returns=1)
        shard = pending.pop(ready[0])
        try:
            result = ray.get(ready[0])
        except ray.exceptions.RayError as e:  # past its retries: the shard stays unfinished, for a rerun
            errors.append(f"shard {shard:0{OOM_SHARD_COUNT}d}: {root_cause(e)}")
            continue
        on_done(result)
    return errors
