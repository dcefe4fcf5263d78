"""Precompute: the Ray Data stage against a single-process sequential loop, and peak memory vs dataset size.

1. Throughput: both decode, VAE-encode, text-encode and write Parquet for the same filtered shards
   (replicated to --rows) with the same models. The loop is plain PyTorch (fp32, torch's default
   threads, batches of 16, its fastest); the stage uses what it uses in production (see docs/PERFORMANCE.md).
   The Ray cluster is started before timing (as on a real cluster); its start-up is printed
   separately. Each run times --rows/2 and --rows rows: end-to-end images/s at the full size, and the
   marginal rate between the sizes, which cancels each side's fixed cost per run (model loading;
   for the stage, its actors importing torch, diffusers and open_clip). Alternating runs; medians and ratios.
2. Streaming: peak unique memory (PSS: shared pages, such as the object store's mapping, counted once
   across processes) of the whole process tree of `ldm stage precompute` (driver, raylet, GCS,
   workers) at 2,000, 8,000 and 32,000 rows, made by replicating the filtered shards.

Needs a work directory where the pipeline ran up to train-vae (e.g. after `make demo`):

    .venv/bin/python bench/precompute.py --workdir work/local [--rows 12000] [--repeats 3]
        [--skip-rss | --skip-throughput] [--memory-rows 2000 8000 32000]
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from _common import cpu_name

from data_prep.precompute.stage import compute_dtype_name
from flows.registry import run as run_stage
from ldm.config import load_config
from ldm.io import storage
from ldm.io.latents import SCHEMA
from ldm.io.shards import decode_rgb, read_shard, shard_urls

SEQ_BATCH = 16  # the loop's best batch here (2 threads: 175-260 images/s against 129-177 at 64, 94-116 at 256)


@torch.no_grad()
def sequential(cfg, shards: list[str], out: Path) -> int:
    """The baseline: one process, one shard after another, the same decode/encode/write."""
    from ldm.autoencoder.model import load_vae
    from ldm.clip.encoder import load_encoder

    vae, encoder = load_vae(cfg).eval(), load_encoder(cfg)
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    for url in shards:
        samples = read_shard(url)
        rows = []
        for i in range(0, len(samples), SEQ_BATCH):
            chunk = samples[i : i + SEQ_BATCH]
            px = np.stack([decode_rgb(s["jpg"], cfg.ingest.resolution) for s in chunk])
            x = torch.from_numpy(px).permute(0, 3, 1, 2).float() / 127.5 - 1
            z = vae.encode(x).latent_dist.mean.numpy().astype(np.float16)
            states, lengths = encoder.token_states([s["txt"] for s in chunk])
            st = states.numpy().astype(np.float16)
            for s, zi, si, li in zip(chunk, z, st, lengths.tolist(), strict=True):
                meta = s["json"]
                rows.append({"key": s["key"], "latent": zi.tobytes(), "scale_factor": 1.0, "latent_is_sample": False,
                             "text_emb": si[:li].tobytes(), "text_len": li, "caption": s["txt"],
                             "aesthetic": meta.get("aesthetic"), "similarity": meta.get("similarity")})  # fmt: skip
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), buf)
        (out / url.rsplit("/", 1)[1].replace(".tar", ".parquet")).write_bytes(buf.getvalue())
        n += len(samples)
    return n


def stage_workdir(src: Path, dest: Path, rows: int | None = None) -> int:
    """A work directory with the source's models and its filtered shards: all of them once, or, for `rows`,
    whole shards taken in order (cycling with new names when more are needed) until at least that many rows."""
    shutil.copytree(src / "models", dest / "models")
    (dest / "raw").mkdir(parents=True)
    shutil.copy(src / "raw" / "manifest.json", dest / "raw")  # upstream identity the stages check, not data
    fm = storage.read_json(str(src / "filtered" / "manifest.json"))
    (dest / "filtered" / "shards").mkdir(parents=True)
    shards: list[dict] = []
    total, copy = 0, 0
    while (rows is None and copy == 0) or (rows is not None and total < rows):
        for s in fm["shards"]:
            if rows is not None and total >= rows:
                break
            name = f"{copy:03d}{s['name']}"
            shutil.copy(src / "filtered" / "shards" / s["name"], dest / "filtered" / "shards" / name)
            shards.append({"name": name, "samples": s["samples"]})
            total += s["samples"]
        copy += 1
    storage.write_json_atomic(str(dest / "filtered" / "manifest.json"), {**fm, "shards": shards})
    return total


def _tree(root: int) -> set[int]:
    """A process and all its descendants, from /proc."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    tree, frontier = {root}, [root]
    while frontier:
        kids = [p for p, pp in parents.items() if pp in frontier and p not in tree]
        tree.update(kids)
        frontier = kids
    return tree


def _tree_pss(root: int) -> int:
    """Summed PSS (bytes) of a process tree: each shared page counts once, split among its sharers.

    Summing RSS instead counts the shared object store (and shared libraries) once per process.
    """
    total = 0
    for pid in _tree(root):
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            continue
    return total


def peak_pss_mb(cmd: list[str]) -> float:
    """Run a command; return the peak summed PSS of its whole process tree, sampled every 0.2 s."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _tree_pss(proc.pid))
        time.sleep(0.2)
    if proc.returncode:
        raise RuntimeError(f"{cmd} failed with {proc.returncode}")
    return peak / 2**20


def main() -> None:
    """Print throughput of both and the RSS comparison."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--workdir", default="work/local")
    p.add_argument("--profile", default="local")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rows", type=int, default=12000, help="filtered rows to time (shards replicated as needed)")
    p.add_argument("--skip-rss", action="store_true", help="skip the memory part")
    p.add_argument("--skip-throughput", action="store_true", help="only the memory part")
    p.add_argument("--memory-rows", type=int, nargs="+", default=[2000, 8000, 32000])
    a = p.parse_args()
    src = Path(a.workdir).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        sizes = {
            "half": stage_workdir(src, base / "half", a.rows // 2),
            "full": stage_workdir(src, base / "full", a.rows),
        }
        warm = stage_workdir(src, base / "warm", 500)  # a few shards: worker start-up, imports, page cache
        cfgs = {k: load_config(a.profile, [], str(base / k)) for k in ("half", "full", "warm")}
        cfg = cfgs["full"]

        def shards_of(k: str) -> list[str]:
            return shard_urls(storage.join(storage.normalize(str(base / k)), "filtered", "shards"))

        from ldm.ray_cluster import ensure_ray

        t0 = time.perf_counter()
        ensure_ray(cfg, cfg.precompute.object_store_mb)
        startup = time.perf_counter() - t0

        def seq(k: str, r: int) -> float:
            t = time.perf_counter()
            sequential(cfgs[k], shards_of(k), base / f"seq-{k}{r}")
            return time.perf_counter() - t

        def ours(k: str, r: int) -> float:
            shutil.rmtree(base / k / "latents", ignore_errors=True)
            t = time.perf_counter()
            run_stage("precompute", cfgs[k])
            return time.perf_counter() - t

        if not a.skip_throughput:
            seq("warm", 0), ours("warm", 0)
            print(f"warm-up done ({warm} rows); timing {sizes['half']} and {sizes['full']} rows", flush=True)
            # Per run: end-to-end images/s at the full size, and the marginal rate between the two sizes,
            # (n_full - n_half) / (t_full - t_half), which cancels fixed costs (model loading, actor start-up).
            end_to_end: dict[str, list[float]] = {"sequential loop": [], "ray data stage": []}
            marginal: dict[str, list[float]] = {"sequential loop": [], "ray data stage": []}
            fixed: dict[str, list[float]] = {"sequential loop": [], "ray data stage": []}
            for r in range(a.repeats):
                order = [("sequential loop", seq), ("ray data stage", ours)]
                for name, fn in order if r % 2 == 0 else order[::-1]:
                    t_half, t_full = fn("half", r), fn("full", r)
                    rate = (sizes["full"] - sizes["half"]) / (t_full - t_half)
                    end_to_end[name].append(sizes["full"] / t_full)
                    marginal[name].append(rate)
                    fixed[name].append(t_full - sizes["full"] / rate)
            print(
                f"\n{cpu_name()}, {sizes['full']} rows, {os.cpu_count()} cores, {cfg.ingest.resolution} px, stage VAE "
                f"compute {compute_dtype_name(cfg)} (images/s; Ray cluster start-up {startup:.1f} s not included)"
            )
            for label, table in (("end to end", end_to_end), ("marginal", marginal)):
                for name, xs in table.items():
                    runs = ", ".join(f"{x:.1f}" for x in xs)
                    print(f"  {label:<10} {name:<16} median {statistics.median(xs):7.1f}   runs {runs}")
                ratio = statistics.median(table["ray data stage"]) / statistics.median(table["sequential loop"])
                print(f"  {label:<10} ratio stage/sequential: {ratio:.2f}x")
            for name, xs in fixed.items():
                print(f"  fixed cost per run, {name}: median {statistics.median(xs):.1f} s")
        if a.skip_rss:
            return
        import ray

        ray.shutdown()
        peaks = {}
        for rows_wanted in a.memory_rows:
            d = base / f"mem{rows_wanted}"
            rows = stage_workdir(src, d, rows_wanted)
            cmd = [sys.executable, "-m", "flows.cli", "stage", "precompute"]
            cmd += ["--profile", a.profile, "--workdir", str(d)]
            peaks[rows] = peak_pss_mb(cmd)
            shutil.rmtree(d)
        (r1, m1), *_ = sorted(peaks.items())
        print("\npeak PSS of the process tree:")
        for r, m in sorted(peaks.items()):
            print(f"  {r:>6} rows {m:7.0f} MB ({100 * (m / m1 - 1):+.1f}% at {r / r1:.1f}x the rows)")


if __name__ == "__main__":
    main()
