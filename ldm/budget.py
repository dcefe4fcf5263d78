"""Fit a profile's training to its time budget on this CPU: calibrate once, scale the step counts, remember.

CPUs of the same name differ by about 2x here: the same `make demo` took 16.9 minutes on one AMD EPYC
2-core machine and 31.6 on another (every stage 1.6-1.9x slower, a one-thread UNet step 0.236 s vs
0.44 s). A profile with a `budget` section says how long its run may take and how its minutes split on
the CPU it was sized on; before the first stage the flow times a few training steps of the tiny UNet
here, and where this CPU is slower than that one by more than the budget's slack it scales the named
step counts (the training stages' minutes) down by one factor, so the whole run still fits. The plan
is written to `<workdir>/budget.json` once and read back by every later load of that work directory
(`ldm.config.load_config`), so reruns, single stages and resumed runs see the same config; delete
the file to calibrate again. Nothing changes on a CPU as fast as the reference or faster.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from ldm.config import BudgetConfig, PipelineConfig, budget_plan_path, get_dotted


def calibration_step_s(mixed_precision: str = "auto") -> float:
    """Median seconds of one tiny-UNet training step on this CPU (ldm/calibrate.py), timed in a fresh process.

    A process of its own: the flow's process never loads torch, and its threads do not share the core.
    """
    out = subprocess.run(
        [sys.executable, "-m", "ldm.calibrate", mixed_precision], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"budget: the calibration step failed: {tail}")
    return float(out.stdout.strip().splitlines()[-1])


def scale_for(budget: BudgetConfig, step_s: float) -> float:
    """The factor for the scaled step counts that fits the run in budget.minutes on a CPU taking step_s.

    Every stage is taken to slow down like the calibration step: on the reference CPU the run takes
    fixed + scaled minutes, here (fixed + s * scaled) * slowdown. 1 where it fits unscaled; never below
    budget.min_scale (the run then overshoots, and the plan says so).
    """
    slowdown = step_s / budget.reference_step_s
    s = (budget.minutes / slowdown - budget.reference_fixed_minutes) / budget.reference_scaled_minutes
    return max(budget.min_scale, min(1.0, s))


def predicted_minutes(budget: BudgetConfig, step_s: float, scale: float) -> float:
    """The run's minutes on a CPU taking step_s with the scaled step counts multiplied by scale."""
    slowdown = step_s / budget.reference_step_s
    return (budget.reference_fixed_minutes + scale * budget.reference_scaled_minutes) * slowdown


def make_plan(cfg: PipelineConfig, step_s: float, cpu: str) -> dict:
    """The plan for this CPU: its measurements, the factor, and the `a.b=N` overrides it implies."""
    budget = cfg.budget
    assert budget is not None
    scale = scale_for(budget, step_s)
    overrides, changes = [], []
    if scale < 1.0:
        for key in budget.scale:
            full = get_dotted(cfg, key)
            if key == "train.ema_decay":  # its window, 1 / (1 - decay) steps, shrinks with the run
                n = round(1 - (1 - full) / scale, 4)
            else:
                n = max(0 if full == 0 else 1, round(full * scale))
            overrides.append(f"{key}={n}")
            changes.append(f"{key} {full} -> {n}")
    return {
        "cpu": cpu,
        "calibration_step_s": round(step_s, 4),
        "reference_step_s": budget.reference_step_s,
        "slowdown": round(step_s / budget.reference_step_s, 3),
        "budget_minutes": budget.minutes,
        "scale": round(scale, 3),
        "predicted_minutes": round(predicted_minutes(budget, step_s, scale), 1),
        "overrides": overrides,
        "summary": _summary(budget, step_s, scale, changes, cpu),
    }


def _summary(budget: BudgetConfig, step_s: float, scale: float, changes: list[str], cpu: str) -> str:
    slowdown = step_s / budget.reference_step_s
    head = (
        f"budget: {cpu} takes {step_s:.3f} s per calibration step, {slowdown:.2f}x the profile's reference "
        f"({budget.reference_step_s} s)"
    )
    if scale >= 1.0:
        return f"{head}: the profile fits its {budget.minutes:g} minutes as it is"
    tail = f" (predicted {predicted_minutes(budget, step_s, scale):.1f} min)"
    if scale <= budget.min_scale and predicted_minutes(budget, step_s, scale) > budget.minutes:
        tail += f": over the budget of {budget.minutes:g} even at the floor budget.min_scale={budget.min_scale}"
    return f"{head}: training scaled by {scale:.2f} to fit {budget.minutes:g} minutes: {', '.join(changes)}{tail}"


def plan_path(cfg: PipelineConfig) -> Path | None:
    """Where this work directory's plan lives: None without a budget, on a GPU or off the local disk."""
    return budget_plan_path(cfg.workdir, cfg.budget is not None, cfg.compute.use_gpu)


def read_plan(cfg: PipelineConfig) -> dict | None:
    """The work directory's plan if one was made."""
    path = plan_path(cfg)
    return json.loads(path.read_text()) if path is not None and path.is_file() else None


def ensure_plan(
    cfg: PipelineConfig, measure: Callable[[str], float] = calibration_step_s, cpu: str | None = None
) -> dict | None:
    """The work directory's plan: read if it exists, else calibrated now and written. None without a budget.

    Only for local work directories on the CPU (a GPU run or a remote work directory has no CPU budget).
    """
    path = plan_path(cfg)
    if path is None or path.is_file():
        return read_plan(cfg)
    plan = make_plan(cfg, measure(cfg.train.mixed_precision), cpu or cpu_name())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(plan, indent=2) + "\n")
    os.replace(tmp, path)  # never half-written: a later load_config reads it
    return plan


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, or the platform's word for it."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
