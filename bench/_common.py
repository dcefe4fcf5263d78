"""Helpers shared by the benchmarks (import as `from _common import ...`: bench/ is on sys.path when a
script in it runs)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from ldm.budget import cpu_name  # noqa: F401 - the benchmarks name their CPU as the budget does


def median_line(name: str, xs: list[float], unit: str, width: int = 28) -> str:
    """'  name   median M unit   runs a, b, c' for a list of per-repeat figures."""
    runs = ", ".join(f"{x:.1f}" for x in xs)
    return f"  {name:<{width}} median {statistics.median(xs):8.1f} {unit}   runs {runs}"


def median_step_s(step: Callable[[], None], repeats: int, warmup: int = 2) -> float:
    """Median seconds of `repeats` calls of step, after `warmup` calls left out (allocator, kernel choice)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
