"""Ingest through Ray against plain img2dataset on one machine: the whole stage, side by side (goal >= 0.9x).

Both download the same synthetic URL list from the same 127.0.0.1 server with the same img2dataset
settings (2 shards at a time, 16 threads each); runs alternate so machine noise hits both. Ours is the
ingest stage as it runs everywhere: preparation and one img2dataset Downloader per shard as Ray tasks, on
the local Ray instance `ensure_ray` starts, here started once before the timed runs (as a cluster is
already up on prod; its start-up is printed apart). Plain img2dataset starts its process pool every run,
as it does on every call. Prints images/s per core for each, medians, and the ratio (ours / plain).

    .venv/bin/python bench/ingest.py [--samples 4000] [--repeats 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import pyarrow.parquet as pq
from _common import cpu_name

from data_prep.sources import _closed_port, serve_synthetic, synthetic_rows
from flows.registry import run as run_stage
from ldm.config import load_config
from ldm.ray_cluster import ensure_ray


def plain_img2dataset(url_list: str, out: str, cfg) -> int:
    """The baseline: img2dataset's own download() with the settings ingest passes it."""
    from img2dataset import download

    ic = cfg.ingest
    download(
        url_list=url_list,
        input_format="parquet",
        url_col="URL",
        caption_col="TEXT",
        save_additional_columns=["WIDTH", "HEIGHT", "rating"],
        output_folder=out,
        output_format="webdataset",
        image_size=ic.resolution,
        resize_mode=ic.resize_mode,
        encode_quality=ic.encode_quality,
        processes_count=ic.processes,
        thread_count=ic.threads,
        number_sample_per_shard=ic.samples_per_shard,
        timeout=ic.timeout_s,
        extract_exif=False,
        enable_wandb=False,
        oom_shard_count=5,
        disallowed_header_directives=["noai", "noimageai"],
    )
    import glob
    import json

    return sum(json.load(open(p))["successes"] for p in glob.glob(f"{out}/*_stats.json"))


def main() -> None:
    """Run both side by side and print the comparison."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--samples", type=int, default=4000)
    p.add_argument("--repeats", type=int, default=4)
    a = p.parse_args()
    cores = os.cpu_count() or 1
    overrides = [
        f"source.num_samples={a.samples}",
        "source.broken.slow_response=0",
        "source.broken.invalid_utf8_caption=0",
        "ingest.samples_per_shard=1000",
        "ingest.processes=2",
        "ingest.threads=16",
        "ingest.resolution=64",
    ]
    cfg = load_config("local", overrides)
    results: dict[str, list[float]] = {"plain img2dataset": [], "ldm ingest stage": []}
    with tempfile.TemporaryDirectory() as tmp, serve_synthetic(cfg.source, slow_s=5) as base:
        table, _ = synthetic_rows(cfg.source, base, _closed_port())
        url_list = os.path.join(tmp, "urls.parquet")
        pq.write_table(table, url_list)

        def plain(r: int) -> float:
            t0 = time.perf_counter()
            n = plain_img2dataset(url_list, os.path.join(tmp, f"plain{r}"), cfg)
            return n / (time.perf_counter() - t0) / cores

        def ours(r: int) -> float:
            c = load_config(
                "local",
                [*overrides, "source.kind=parquet", f"source.paths=[{url_list}]"],
                os.path.join(tmp, f"ours{r}"),
            )
            t0 = time.perf_counter()
            n = run_stage("ingest", c)["counts"]["success"]
            return n / (time.perf_counter() - t0) / cores

        t0 = time.perf_counter()
        ensure_ray(cfg)
        ray_start = time.perf_counter() - t0
        plain(-1), ours(-1)  # warm-up: page cache, imports, first-spawn costs; not counted
        for r in range(a.repeats):  # alternate which goes first so drift hits both alike
            order = [("plain img2dataset", plain), ("ldm ingest stage", ours)]
            for name, fn in order if r % 2 == 0 else order[::-1]:
                results[name].append(fn(r))
    print(f"\n{a.samples} URLs, {cores} cores ({cpu_name()}), {a.repeats} alternating runs after a warm-up "
          "(images/s per core, wall)")  # fmt: skip
    print(f"  local Ray start (once, before the runs): {ray_start:.1f} s")
    for name, xs in results.items():
        print(f"  {name:<18} median {statistics.median(xs):7.1f}   runs {', '.join(f'{x:.1f}' for x in xs)}")
    ratio = statistics.median(results["ldm ingest stage"]) / statistics.median(results["plain img2dataset"])
    print(f"  ratio ours/plain: {ratio:.3f}  (overhead {100 * (1 - ratio):+.1f}%; goal >= 0.9)")


if __name__ == "__main__":
    main()
