"""The driver's share of the data stages: CPU seconds and peak unique memory of the process that drives
ingest, filter and precompute, per 1,000 rows, at two list lengths (goal: flat in rows).

That process is the flow's own on the local profile and each stage's Ray job driver on prod: the same code
(flows.registry.run) either way. The work itself runs in Ray's worker processes and the synthetic source's
server process, neither of which this process's rusage counts. Peak unique memory is the process's USS
(Private_Clean + Private_Dirty of /proc/self/smaps_rollup), sampled every 50 ms while the stage runs: the
driver's own memory, not the shared libraries and not Ray's object store (shared memory).

Each stage runs in a fresh process, as each stage's Ray job driver is one on prod, so a stage's peak is its
own. The component models (tiny CLIP, aesthetic MLP, VAE) are trained briefly, in processes of their own,
in each size's work directory (a model's identity includes the source it was trained on).

    .venv/bin/python bench/driver.py [--rows 8000 64000]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import cpu_name

from flows.registry import run as run_stage
from ldm.config import load_config

STAGES = ("ingest", "filter", "precompute")
BEFORE = {"filter": ("train-clip", "train-aesthetic"), "precompute": ("train-vae",)}


def uss_mb() -> float:
    """This process's unique memory now, MB."""
    kb = 0
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                kb += int(line.split()[1])
    return kb / 1024


class PeakUss(threading.Thread):
    """Samples uss_mb() every 50 ms until stopped; `.peak` is the largest sample."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self._done = uss_mb(), threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.05):
            self.peak = max(self.peak, uss_mb())

    def stop(self) -> float:
        self._done.set()
        self.join()
        return max(self.peak, uss_mb())


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process, none of its children
    return r.ru_utime + r.ru_stime


def measure(stage: str, cfg) -> dict:
    """Driver CPU s, peak USS MB and wall s of one stage run in this process."""
    sampler = PeakUss()
    sampler.start()
    c0, t0 = cpu_s(), time.perf_counter()
    run_stage(stage, cfg)
    wall = time.perf_counter() - t0
    return {"cpu": cpu_s() - c0, "peak": sampler.stop(), "wall": wall}


def config(workdir: Path, rows: int):
    return load_config(
        "test",
        [
            f"source.num_samples={rows}",
            "source.broken.slow_response=0",
            "ingest.samples_per_shard=500",
            "ingest.processes=2",
            "ingest.threads=16",
            "precompute.batch_size=256",
            # The component models only need to exist (filter and precompute load them): trained briefly.
            "clip.epochs=1",
            "aesthetic.epochs=5",
            "vae.steps=20",
        ],
        str(workdir),
    )


def child(stage: str, rows: int, workdir: Path) -> dict:
    """Run one stage in a fresh process, as a Ray job's driver is one: its figures, or None for a component."""
    done = subprocess.run([sys.executable, __file__, "--child", stage, str(rows), str(workdir)],
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode:
        raise SystemExit(f"{stage} at {rows:,} rows failed:\n{done.stderr[-3000:]}")
    out = done.stdout
    line = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    return json.loads(line[-1].removeprefix("RESULT ")) if line else {}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rows", type=int, nargs="+", default=[8000, 64000])
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        stage, rows, workdir = a.child
        cfg = config(Path(workdir), int(rows))
        if stage in STAGES:
            print("RESULT " + json.dumps(measure(stage, cfg)))
        else:
            run_stage(stage, cfg)
        return
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores")
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-driver-") as tmp:
        for rows in a.rows:
            w = Path(tmp) / f"r{rows}"
            for stage in STAGES:
                for component in BEFORE.get(stage, ()):  # the models it needs (the VAE trains on filtered shards)
                    child(component, rows, w)
                r = results[rows, stage] = child(stage, rows, w)
                print(f"  {rows:>7,} rows  {stage:<10} driver CPU {r['cpu']:7.1f} s  peak USS {r['peak']:7.0f} MB  "
                      f"wall {r['wall']:6.1f} s", flush=True)  # fmt: skip
    print("\nper 1,000 rows: driver CPU s; peak USS (MB) at each size; ratio last/first size (flat: <= 1)")
    lo, hi = a.rows[0], a.rows[-1]
    for stage in STAGES:
        per = {r: results[r, stage]["cpu"] / r * 1000 for r in a.rows}
        cells = "  ".join(f"{r:,}: {c:.3f} s" for r, c in per.items())
        peaks = " -> ".join(f"{results[r, stage]['peak']:.0f}" for r in a.rows)
        first_k, last_k = (results[r, stage]["peak"] / r * 1000 for r in (lo, hi))
        print(f"  {stage:<10} {cells}  CPU ratio {per[hi] / per[lo]:.2f}; peak USS {peaks} MB "
              f"(per 1,000 rows {first_k:.1f} -> {last_k:.1f})")  # fmt: skip


if __name__ == "__main__":
    main()
