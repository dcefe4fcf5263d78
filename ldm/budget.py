"""The time budget: each training stage times its own steps where it runs and trains as many as fit.

CPUs of one name differ about 2x here, and not in one ratio: a one-process proxy step (the tiny UNet,
one thread) read 1.40x the reference on an Intel Xeon whose two-worker DDP train stage ran as slowly as
on an AMD EPYC that read 1.79x. So nothing is predicted from a proxy. A stage named in `budget.stages`
(train-vae, train) times a few steps of its real configuration (workers, threads, precision, model
size) on a throwaway copy of its state, then fixes its step count from its seconds:

- run alone (`ldm stage`), a stage gets `seconds`;
- in a flow (`ldm run` sets `budget.deadline`), it gets its share of what is left before the deadline
  once `after_s` is kept for the later work that no budget sizes; a stage that ends early leaves its
  seconds to the ones after it, and so does one that hits its configured step count.

A count never exceeds the configured steps nor falls below `min_scale` of them. The count, the step
time and the seconds are recorded in `<workdir>/budget.json` under the stage's config hash as soon as
they are known, and in the stage's manifest and MLflow run: a rerun or a resumed run of the same
config reuses the count without timing anything, so it trains exactly what the first one did.
Warm-up and the EMA's window shrink with the count (`scaled_train`), as a run configured with that
many steps would have them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from ldm.config import BUDGETED_STAGES, BudgetConfig, PipelineConfig, TrainConfig
from ldm.io import storage

BUDGET_FILE = "budget.json"  # a work directory's recorded step counts: {stage: {config hash: record}}
PROBE_WARMUP = 3  # timed steps left out: allocation, oneDNN's kernel choice, gloo's first all-reduce
PROBE_STEPS = 12  # then timed: ~3-5 s a stage on these CPUs


def applies(cfg: PipelineConfig, stage: str) -> bool:
    """Whether `stage` sizes its steps to a budget here: a budget naming it, on the CPU."""
    return cfg.budget is not None and stage in cfg.budget.stages and not cfg.compute.use_gpu


def clock(cfg: PipelineConfig, started: float) -> list[str]:
    """The override that starts a flow's clock at `started` (Unix time), where a budget applies and none runs yet."""
    b = cfg.budget
    if b is None or b.deadline is not None or cfg.compute.use_gpu:
        return []
    return [f"budget.deadline={started + b.minutes * 60:.1f}"]


def allowance_s(budget: BudgetConfig, stage: str, now: float) -> float:
    """Seconds for `stage`'s training steps: its share of the time left before the deadline, or its own seconds."""
    own = budget.stages[stage]
    if budget.deadline is None:
        return own.seconds
    later = [s for s in BUDGETED_STAGES[BUDGETED_STAGES.index(stage) :] if s in budget.stages]
    weight = own.seconds / sum(budget.stages[s].seconds for s in later)
    return max(0.0, (budget.deadline - now - own.after_s) * weight)


def steps_for(seconds: float, step_s: float, full: int, min_scale: float) -> int:
    """How many steps of step_s fit in seconds: at most `full`, at least min_scale of it."""
    floor = max(1, math.ceil(full * min_scale))
    return max(floor, min(full, int(seconds / step_s)))


def time_steps(step: Callable[[], None], steps: int = PROBE_STEPS, warmup: int = PROBE_WARMUP,
               clock: Callable[[], float] = time.perf_counter) -> float:  # fmt: skip
    """Mean seconds of `steps` calls of step, after `warmup` calls left out.

    A mean, not a median: the stage pays for its slow steps too.
    """
    for _ in range(warmup):
        step()
    t0 = clock()
    for _ in range(steps):
        step()
    return (clock() - t0) / steps


def decide(budget: BudgetConfig, stage: str, full: int, step_s: float, now: float) -> dict:
    """The record of one stage's count: steps, the configured steps, the measured step time and the seconds."""
    seconds = allowance_s(budget, stage, now)
    steps = steps_for(seconds, step_s, full, budget.min_scale)
    return {
        "steps": steps,
        "full_steps": full,
        "step_s": round(step_s, 5),
        "seconds": round(seconds, 1),
        "predicted_s": round(steps * step_s, 1),
        "cpu": cpu_name(),
    }


def _file(cfg: PipelineConfig) -> str:
    return storage.join(storage.normalize(cfg.workdir), BUDGET_FILE)


def recall(cfg: PipelineConfig, stage: str, config_hash: str) -> dict | None:
    """The count recorded for this stage and config, if a run of it was ever sized."""
    url = _file(cfg)
    if not storage.exists(url):
        return None
    return (storage.read_json(url).get(stage) or {}).get(config_hash)


def remember(cfg: PipelineConfig, stage: str, config_hash: str, record: dict) -> None:
    """Record a stage's count under its config hash (written whole, never half)."""
    url = _file(cfg)
    known = storage.read_json(url) if storage.exists(url) else {}
    known.setdefault(stage, {})[config_hash] = record
    storage.write_json_atomic(url, known)


def sized(cfg: PipelineConfig, stage: str, config_hash: str, full: int, measure: Callable[[], float],
          now: Callable[[], float] = time.time) -> dict | None:  # fmt: skip
    """This stage's count here: recalled, or measured now and recorded; None where no budget applies."""
    if not applies(cfg, stage):
        return None
    record = recall(cfg, stage, config_hash)
    if record is not None:
        return {**record, "reused": True}
    assert cfg.budget is not None
    record = decide(cfg.budget, stage, full, measure(), now())
    remember(cfg, stage, config_hash, record)
    return record


def scaled_train(tc: TrainConfig, steps: int) -> TrainConfig:
    """The train section as a run of `steps` steps has it: warm-up and the EMA's window shrink in proportion.

    The EMA's window is 1 / (1 - decay) steps; a decay scaled like a step count would average nothing.
    """
    if steps >= tc.steps:
        return tc
    ratio = steps / tc.steps
    warmup = max(1, round(tc.warmup_steps * ratio)) if tc.warmup_steps else 0
    decay = max(0.0, 1 - (1 - tc.ema_decay) / ratio)  # a decay of 0 (no averaging) stays 0
    return tc.model_copy(update={"steps": steps, "warmup_steps": warmup, "ema_decay": decay})


def summary(stage: str, record: dict | None) -> str | None:
    """One line on a stage's count where the budget shortened it; None where it trained its configured steps."""
    if not record or record["steps"] >= record["full_steps"]:
        return None
    return (
        f"budget: {stage} trained {record['steps']:,} of {record['full_steps']:,} steps: {record['step_s']:.3f} s a "
        f"step measured on {record['cpu']}, {record['seconds']:.0f} s left to its steps"
    )


def cpu_name(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model name from /proc/cpuinfo, or the platform's word for it."""
    import platform
    from pathlib import Path

    try:
        for line in Path(cpuinfo).read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
