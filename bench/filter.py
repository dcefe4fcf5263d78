"""Filter throughput: the stage (Ray Data, a pool of scorer actors) against the one-process shard loop it
replaced, and both against a naive one-image-at-a-time loop.

All read the same raw shards, decode, score with the same CLIP and aesthetic MLP, apply the same
thresholds and write the same outputs; runs alternate so machine noise hits them alike. The loop is
the stage as it was before it ran on Ray (batched, torch's default threads, in this process), timed with
its models already loaded and, as a run of that stage went, with their loading; the Ray cluster is started
before timing, as on a real cluster, and each Ray run includes its actors' start-up (their models' loading).
Needs a work directory where ingest, train-clip and train-aesthetic have run (e.g. after `make demo`).

    .venv/bin/python bench/filter.py --workdir work/local [--shards 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
from _common import cpu_name

from data_prep.filter import Scorer, drop_reason, filter_shard, score_shards
from ldm.aesthetic.stage import load_scorer
from ldm.clip.encoder import load_encoder
from ldm.config import load_config
from ldm.io import storage
from ldm.io.shards import decode_rgb, read_shard, shard_urls, write_shard
from ldm.ray_cluster import ensure_ray


@torch.no_grad()
def naive_filter_shard(tar_url: str, out: str, encoder, mlp, cfg) -> int:
    """The baseline: every sample decoded and scored on its own, then the kept ones written."""
    kept = []
    samples = read_shard(tar_url)
    for s in samples:
        img = encoder.encode_images(decode_rgb(s["jpg"], cfg.ingest.resolution)[None])
        txt = encoder.encode_text([s["txt"]])
        a, c = float(mlp(img)[0]), float((img * txt).sum())
        if drop_reason(a, c, cfg.filter) is None:
            kept.append({**s, "json": {**s["json"], "aesthetic": a, "similarity": c}})
    write_shard(storage.join(out, tar_url.rsplit("/", 1)[1]), kept)
    return len(samples)


def main() -> None:
    """Run both side by side and print images/s and the ratio."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--workdir", default="work/local")
    p.add_argument("--profile", default="local")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    cfg = load_config(a.profile, [], a.workdir)
    torch.set_num_threads(os.cpu_count() or 1)
    encoder = load_encoder(cfg)
    mlp = load_scorer(cfg, encoder.embed_dim)
    scorer = Scorer(encoder, mlp, cfg.ingest.resolution, cfg.filter.batch_size)
    shards = shard_urls(storage.join(storage.normalize(cfg.workdir), "raw", "shards"))[: a.shards]
    results: dict[str, list[float]] = {"naive loop": [], "shard loop": [], "shard loop + load": [],
                                       "ray data stage": []}  # fmt: skip
    ensure_ray(cfg)
    with tempfile.TemporaryDirectory() as tmp:

        def naive(r: int) -> float:
            t0 = time.perf_counter()
            n = sum(naive_filter_shard(u, f"{tmp}/naive{r}", encoder, mlp, cfg) for u in shards)
            return n / (time.perf_counter() - t0)

        def loop(r: int) -> float:
            t0 = time.perf_counter()
            n = sum(filter_shard(u, f"{tmp}/loop{r}", scorer, cfg.filter)["samples"] for u in shards)
            return n / (time.perf_counter() - t0)

        def loop_loading(r: int) -> float:
            """The replaced stage as a run of it went: load CLIP and the MLP, then the loop (the Ray arm's
            actors load theirs inside its timing)."""
            t0 = time.perf_counter()
            enc = load_encoder(cfg)
            own = Scorer(enc, load_scorer(cfg, enc.embed_dim), cfg.ingest.resolution, cfg.filter.batch_size)
            n = sum(filter_shard(u, f"{tmp}/loop_loading{r}", own, cfg.filter)["samples"] for u in shards)
            return n / (time.perf_counter() - t0)

        def ray_stage(r: int) -> float:
            t0 = time.perf_counter()
            score_shards(cfg, shards, f"{tmp}/ray{r}")
            return samples / (time.perf_counter() - t0)

        samples = sum(len(read_shard(u)) for u in shards)
        naive(-1), loop(-1), loop_loading(-1), ray_stage(-1)  # warm-up
        for r in range(a.repeats):
            order = [("naive loop", naive), ("shard loop", loop), ("shard loop + load", loop_loading),
                     ("ray data stage", ray_stage)]  # fmt: skip
            for name, fn in order if r % 2 == 0 else order[::-1]:
                results[name].append(fn(r))
    print(
        f"\n{samples} samples in {len(shards)} shards, {os.cpu_count()} cores, batch {cfg.filter.batch_size} (images/s)"
    )
    for name, xs in results.items():
        print(f"  {name:<17} median {statistics.median(xs):8.1f}   runs {', '.join(f'{x:.1f}' for x in xs)}")
    med = {name: statistics.median(xs) for name, xs in results.items()}
    print(f"  ratio ray data stage / shard loop + load: {med['ray data stage'] / med['shard loop + load']:.2f}x")
    print(f"  ratio ray data stage / shard loop: {med['ray data stage'] / med['shard loop']:.2f}x")
    print(f"  ratio shard loop / naive: {med['shard loop'] / med['naive loop']:.2f}x")
    print(f"  CPU: {cpu_name()}")


if __name__ == "__main__":
    main()
