"""The ingest stage: the URL list, prepared and downloaded by img2dataset as Ray tasks, into W/raw/shards/.

The driver lists the inputs, starts the tasks (data_prep/ingest/cluster.py) and keeps counts and per-shard
results only; every row is read, checked and fetched inside a task, on the profile's Ray cluster or the
local instance `ensure_ray` starts. The output is what img2dataset writes: W/raw/shards/00000.tar with its
.parquet and _stats.json per shard.
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter

from tqdm import tqdm

from data_prep.ingest.outcomes import OOM_SHARD_COUNT, read_shard_stats, tally
from data_prep.ingest.prepare import inspect_inputs
from data_prep.sources import open_source
from ldm.io import storage
from ldm.io.manifest import StageError
from ldm.ray_cluster import ensure_ray
from ldm.stage import StageRun, stage_log_file


def _finished(shards_url: str) -> set[int]:
    """Ids of the shards whose stats file exists (img2dataset writes it last; our tasks publish it last)."""
    fs, path = storage.fs_for(shards_url)
    names = (p.rsplit("/", 1)[-1] for p in fs.glob(f"{path}/*_stats.json")) if fs.exists(path) else ()
    return {int(n.removesuffix("_stats.json")) for n in names}


def _append_log(chatter: str) -> None:
    """A shard's captured img2dataset chatter, into the stage's log (W/logs/ingest.log) when there is one."""
    log = stage_log_file()
    if chatter and log:
        os.makedirs(os.path.dirname(log), exist_ok=True)
        with open(log, "a") as f:
            f.write(chatter if chatter.endswith("\n") else chatter + "\n")


def ingest(run: StageRun) -> dict:
    """Download the profile's URL list into W/raw/shards, resuming from finished shards; the manifest's fields."""
    cfg, out, ic = run.cfg, run.out, run.cfg.ingest
    started = time.time()
    with open_source(cfg, run.workdir.source) as source:
        inputs = inspect_inputs(source.paths, ic.columns, ic.prefilter)  # refuses bad input before any write
        ensure_ray(cfg)
        from data_prep.ingest import cluster  # imports ray and img2dataset: only when the stage runs
        from data_prep.ingest.fetch import make_downloader

        run.begin()
        shards_url = run.workdir.raw_shards
        tmp_url, prepared_url = storage.join(shards_url, "_tmp"), storage.join(out, "_prepared")
        done = _finished(shards_url)
        plan = cluster.prepare_all(inputs, ic, prepared_url, tmp_url, done)
        expected = len(plan.shard_rows)
        if done:
            print(f"ingest: resuming; {len(done & set(plan.shard_rows))} of {expected} shards already done")
        t0, results, nodes = time.time(), {}, Counter()
        if plan.todo:
            extras = [e for e in ic.columns.extra if any(e in i.extras for i in inputs)]
            bar = tqdm(total=sum(plan.rows), unit="img", desc="ingest", dynamic_ncols=True, file=sys.stderr,
                       initial=sum(n for s, n in plan.shard_rows.items() if s in done))  # fmt: skip

            def on_done(result: dict) -> None:
                results[result["shard"]] = result["stats"]
                nodes[result["node"]] += 1
                _append_log(result["log"])
                bar.update(result["stats"]["count"])

            try:
                errors = cluster.download_all(plan, make_downloader(ic, extras), shards_url, ic.processes,
                                              ic.shard_retries, on_done)  # fmt: skip
            finally:
                bar.close()
            if errors:
                raise StageError(f"ingest incomplete: {len(errors)} shards failed ({errors[0]}); rerun to resume")
        download_s = time.time() - t0
    # This run's shards reported their stats as they finished; a resumed run reads the earlier ones' (in parallel).
    stats = {**read_shard_stats(shards_url, sorted(done & set(plan.shard_rows))), **results}
    stats = {f"{k:0{OOM_SHARD_COUNT}d}": v for k, v in sorted(stats.items())}
    if len(stats) != expected:
        raise StageError(f"ingest incomplete: {len(stats)} of {expected} shards finished in {shards_url}; rerun")
    for leftover in (tmp_url, storage.join(shards_url, "_attempts"), prepared_url):
        storage.remove(leftover)  # the prepared list and shard inputs: only needed until every shard is done
    outcomes, messages = tally(stats)
    counts = plan.dropped + outcomes
    new_successes = sum(s["successes"] for s in results.values())
    fs, shards_path = storage.fs_for(shards_url)
    tar_bytes = sum(info["size"] for info in fs.glob(f"{shards_path}/*.tar", detail=True).values())
    return dict(
        sources=[{"url": i.url, "rows": i.rows} for i in inputs],
        source_manifest=source.manifest,
        counts=dict(sorted(counts.items())),
        messages=dict(messages.most_common(50)),
        prefilter_unknown=dict(sorted(plan.unjudged.items())),
        rows_in=sum(i.rows for i in inputs),
        rows_downloaded=sum(plan.rows),
        shards=[{"name": f"{k}.tar", "samples": v["successes"], "rows": v["count"]} for k, v in sorted(stats.items())],
        shards_resumed=len(done & set(plan.shard_rows)),
        shards_by_node=dict(sorted(nodes.items())),  # Ray node id -> shards it downloaded in this run
        bytes=tar_bytes,
        resolution=cfg.ingest.resolution,
        timings={"total_s": round(time.time() - started, 2), "download_s": round(download_s, 2)},
        images_per_s=round(new_successes / download_s, 2) if plan.todo else None,
    )


def summary(m: dict) -> str:
    """A human summary of an ingest manifest: counts by outcome, throughput, size."""
    counts = m["counts"]
    width = max(len(k) for k in counts) if counts else 10
    lines = [f"ingest summary ({m['rows_in']} rows in, {len(m['shards'])} shards, {m['bytes'] / 1e6:.1f} MB)"]
    lines += [f"  {k:<{width}}  {v:>8}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])]
    if m.get("prefilter_unknown"):  # rows a prefilter threshold could not judge (null in the list) and let through
        lines.append("  passed unjudged (null): " + ", ".join(f"{k} {v}" for k, v in m["prefilter_unknown"].items()))
    resumed = f" (resumed {m['shards_resumed']} finished shards)" if m.get("shards_resumed") else ""
    if m.get("images_per_s") is None:
        lines.append(f"  nothing left to download{resumed}")
    else:
        lines.append(f"  throughput: {m['images_per_s']} images/s over {m['timings']['download_s']} s{resumed}")
    return "\n".join(lines)
