"""The ingest stage: img2dataset downloads the URL list into webdataset shards under W/raw/shards/."""

from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator

from tqdm import tqdm

from data_prep.ingest.outcomes import read_shard_stats, tally
from data_prep.ingest.prepare import inspect_inputs, prepare
from data_prep.ingest.url_guard import UrlGuard
from data_prep.sources import open_source
from ldm.config import PipelineConfig
from ldm.io import storage
from ldm.io.manifest import StageError
from ldm.stage import StageRun, stage_log_file

OOM_SHARD_COUNT = 5  # shard names are 5 digits: 00000.tar


@contextlib.contextmanager
def _quiet(log_path: str) -> Iterator[int]:
    """Send this process's (and its workers') stdout/stderr to a log file; yield a dup of the real stderr.

    img2dataset prints per-shard chatter and its own progress bars from spawned workers; the user
    sees one progress bar and the summary, and the chatter is kept in the stage's log.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    os.makedirs(os.path.dirname(log_path), exist_ok=True)  # the stage log's folder is made on first use
    with open(log_path, "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    try:
        yield saved[1]
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


@contextlib.contextmanager
def _progress(shards_url: str, total: int, stderr_fd: int, interval: float = 0.5) -> Iterator[None]:
    """A progress bar over samples, fed by the per-shard stats img2dataset writes as shards finish."""
    stream = os.fdopen(os.dup(stderr_fd), "w")
    bar = tqdm(total=total, unit="img", desc="ingest", dynamic_ncols=True, file=stream)
    stop = threading.Event()

    def poll() -> None:
        while True:
            done = sum(s["count"] for s in read_shard_stats(shards_url).values())
            bar.update(done - bar.n)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        bar.close()
        stream.close()


def _download(cfg: PipelineConfig, input_url: str, shards_url: str, extras: list[str]) -> None:
    from img2dataset import download  # heavy import, only when a download runs

    from data_prep.ingest.fetch import guarded_downloads

    ic = cfg.ingest
    with guarded_downloads(ic.url_policy):  # every hop checked, every connection pinned (fetch.py)
        download(
            url_list=input_url,
            input_format="parquet",
            url_col="url",
            caption_col="caption",
            save_additional_columns=extras or None,
            output_folder=shards_url,
            output_format="webdataset",
            image_size=ic.resolution,
            resize_mode=ic.resize_mode,
            encode_format="jpg",
            encode_quality=ic.encode_quality,
            max_image_area=ic.max_image_area,
            processes_count=ic.processes,
            thread_count=ic.threads,
            number_sample_per_shard=ic.samples_per_shard,
            timeout=ic.timeout_s,
            retries=ic.retries,
            extract_exif=False,
            enable_wandb=False,
            incremental_mode="incremental",
            oom_shard_count=OOM_SHARD_COUNT,
            disallowed_header_directives=["noai", "noimageai"],
        )


def ingest(run: StageRun) -> dict:
    """Download the profile's URL list into W/raw/shards, resuming from finished shards; the manifest's fields."""
    cfg, out = run.cfg, run.out
    started = time.time()
    with open_source(cfg, run.workdir.source) as source:
        inputs = inspect_inputs(source.paths, cfg.ingest.columns)  # refuses bad input before any write
        run.begin()
        guard = UrlGuard(cfg.ingest.url_policy)
        input_url, shards_url = storage.join(out, "_input"), run.workdir.raw_shards
        prepared = prepare(inputs, cfg.ingest.columns, guard, input_url)
        expected_shards = sum(math.ceil(n / cfg.ingest.samples_per_shard) for n in prepared.rows)
        before = read_shard_stats(shards_url) if storage.exists(shards_url) else {}
        if before:
            print(f"ingest: resuming; {len(before)} of {expected_shards} shards already done")
        t0 = time.time()
        if len(before) < expected_shards:
            with tempfile.TemporaryDirectory() as tmp:
                # img2dataset's chatter goes to the stage's log (W/logs/ingest.log) when run through the protocol
                log = stage_log_file() or os.path.join(tmp, "img2dataset.log")
                try:
                    with _quiet(log) as stderr_fd, _progress(shards_url, sum(prepared.rows), stderr_fd):
                        _download(cfg, input_url, shards_url, prepared.extras)
                finally:
                    if log != stage_log_file():
                        with open(log, "rb") as f:
                            url = storage.join(out, "logs", f"ingest-{int(t0)}.log")
                            storage.write_bytes_atomic(url, f.read())
        download_s = time.time() - t0
    stats = read_shard_stats(shards_url)
    if len(stats) != expected_shards:
        raise StageError(
            f"ingest incomplete: {len(stats)} of {expected_shards} shards finished in {shards_url}; rerun to resume"
        )
    outcomes, messages = tally(stats)
    counts = Counter(prepared.dropped) + outcomes
    new_successes = sum(s["successes"] for name, s in stats.items() if name not in before)
    fs, shards_path = storage.fs_for(shards_url)
    tar_bytes = sum(fs.size(p) for p in fs.glob(f"{shards_path}/*.tar"))
    return dict(
        sources=[{"url": i.url, "rows": i.rows} for i in inputs],
        source_manifest=source.manifest,
        counts=dict(sorted(counts.items())),
        messages=dict(messages.most_common(50)),
        rows_in=sum(i.rows for i in inputs),
        rows_downloaded=sum(prepared.rows),
        shards=[{"name": f"{k}.tar", "samples": v["successes"], "rows": v["count"]} for k, v in sorted(stats.items())],
        shards_resumed=len(before),
        bytes=tar_bytes,
        resolution=cfg.ingest.resolution,
        timings={"total_s": round(time.time() - started, 2), "download_s": round(download_s, 2)},
        images_per_s=round(new_successes / download_s, 2) if len(before) < expected_shards else None,
    )


def summary(m: dict) -> str:
    """A human summary of an ingest manifest: counts by outcome, throughput, size."""
    counts = m["counts"]
    width = max(len(k) for k in counts) if counts else 10
    lines = [f"ingest summary ({m['rows_in']} rows in, {len(m['shards'])} shards, {m['bytes'] / 1e6:.1f} MB)"]
    lines += [f"  {k:<{width}}  {v:>8}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])]
    resumed = f" (resumed {m['shards_resumed']} finished shards)" if m.get("shards_resumed") else ""
    if m.get("images_per_s") is None:
        lines.append(f"  nothing left to download{resumed}")
    else:
        lines.append(f"  throughput: {m['images_per_s']} images/s over {m['timings']['download_s']} s{resumed}")
    return "\n".join(lines)
