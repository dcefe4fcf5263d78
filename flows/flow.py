"""The Prefect flow `train-ldm`: every stage of the registry in order, each a thin task over `flows.registry.run`.

The stage protocol does the real work of skipping finished stages and resuming killed ones, so a flow
run started again after any kill picks up where the last one stopped. With a Ray cluster address the Ray
stages run there as Ray jobs (flows.jobs); without one, everything runs in this process.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from flows import endpoints, jobs, report
from flows.registry import STAGES
from flows.registry import run as run_stage
from ldm import budget
from ldm.config import ConfigError, load_config, phase_overrides
from ldm.io import manifest, storage
from ldm.io.manifest import StageError
from ldm.io.storage import StorageError
from ldm.stage import Workdir
from ldm.tracking import tracking_uri

# Retried with back-off: stages whose failures can be passing (an image host, the object store, a node).
# Training stages are not: a retry would repeat minutes of compute for a failure that is almost never passing.
IO_STAGES = ("ingest", "precompute")
RETRY_DELAYS_S = [10, 30, 90]


def _transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry only what may pass: never a config or stage error the user must fix (it would fail the same way)."""
    error = state.result(raise_on_failure=False)
    return not isinstance(error, ConfigError | StageError | StorageError)


def _read_manifest(url: str) -> dict | None:
    path = storage.join(url, manifest.MANIFEST)
    return storage.read_json(path) if storage.exists(path) else None


def run_one(name: str, profile: str, overrides: list[str], workdir: str | None, overwrite: bool,
            allow_partial: bool) -> dict:  # fmt: skip
    """One stage: here, or as a Ray job on the cluster for the Ray stages; a markdown artifact says how it went."""
    logger = get_run_logger()
    cfg = load_config(profile, overrides, workdir)
    out = Workdir.of(cfg).output(name)
    before = _read_manifest(out)
    address = endpoints.ray_address(cfg)
    job = None
    if address and name in endpoints.RAY_STAGES:
        flags = [f for f, on in (("--overwrite", overwrite), ("--allow-partial", allow_partial)) if on]
        command = jobs.entrypoint(name, profile, overrides, workdir, flags)
        sid = jobs.run_job(address, name, cfg, command, str(flow_run.id or "local"), logger.info)
        job = f"[{sid}]({jobs.job_url(address, sid)})"
        m = _read_manifest(out)
        if m is None:
            raise StageError(f"{name}: Ray job {sid} succeeded but left no manifest in {out}")
    else:
        m = run_stage(name, cfg, overwrite, allow_partial)
    skipped = before is not None and before == m
    if skipped:
        logger.info(f"{name}: skipped: {out} already matches this config and its inputs")
    text = report.stage_markdown(
        name, m, skipped=skipped, output=out, tracking_uri=tracking_uri(cfg),
        dashboard=endpoints.dashboard_url(address) if address else None, job=job,
        summary=report.summary_text(name, m),
    )  # fmt: skip
    create_markdown_artifact(text, key=f"stage-{name}", description=f"{name}: {'skipped' if skipped else 'done'}")
    return m


def stage_task(name: str):
    """The Prefect task of one stage: retried with back-off if it does I/O, never cached (the manifest is the cache)."""
    io = name in IO_STAGES
    return task(
        run_one,
        name=name,
        task_run_name=name,
        retries=len(RETRY_DELAYS_S) if io else 0,
        retry_delay_seconds=RETRY_DELAYS_S if io else 0,
        retry_condition_fn=_transient if io else None,
        cache_policy=NO_CACHE,
        persist_result=False,
    )


TASKS = {s.name: stage_task(s.name) for s in STAGES}


def select(stages: list[str] | None) -> list[str]:
    """The stages to run, in registry order: all of them, or the named ones (an unknown name is a ConfigError)."""
    if not stages:
        return list(TASKS)
    unknown = [s for s in stages if s not in TASKS]
    if unknown:
        raise ConfigError("stages", f"unknown stage {unknown[0]!r} (have: {', '.join(TASKS)})")
    return [s for s in TASKS if s in stages]


PHASE_STAGES = ("precompute", "train")  # what a training phase runs with its own settings (config `phases`)


def _run_phases(phases: list[list[str]], names: list[str], profile: str, overrides: list[str],
                workdir: str | None, overwrite: bool, allow_partial: bool, results: dict) -> None:  # fmt: skip
    """The phases in order; the last phase's manifests under the stage names, the others' under name[run]."""
    for i, sets in enumerate(phases):
        run = load_config(profile, overrides + sets, workdir).train.run_id
        for name in names:
            m = TASKS[name](name, profile, overrides + sets, workdir, overwrite, allow_partial)
            results[name if i == len(phases) - 1 else f"{name}[{run}]"] = m


@flow(name="train-ldm", log_prints=True, validate_parameters=True)
def train_ldm(
    profile: str = "local",
    overrides: list[str] | None = None,
    workdir: str | None = None,
    stages: list[str] | None = None,
    overwrite: bool = False,
    allow_partial: bool = False,
) -> dict[str, dict]:
    """Run the pipeline's stages in order on one profile; returns each stage's manifest by name.

    The config is validated and every endpoint checked before the first stage starts.
    """
    overrides = list(overrides or [])
    cfg = load_config(profile, overrides, workdir)  # a wrong field or profile ends the run here, naming it
    overrides = endpoints.env_overrides(cfg) + overrides  # the stage jobs see the same config as this run
    cfg = load_config(profile, overrides, workdir)
    names = select(stages)
    endpoints.check(cfg, names)
    clock = budget.clock(cfg, time.time())  # a time budget: the training stages share what is left of it
    if clock:
        overrides += clock
        cfg = load_config(profile, overrides, workdir)
    if cfg.budget is not None and cfg.budget.deadline is not None:
        until = time.strftime("%H:%M:%S", time.localtime(cfg.budget.deadline))
        get_run_logger().info(f"budget: {cfg.budget.minutes:g} minutes, until {until}")
    results = {}
    phases = phase_overrides(cfg)
    for name in names:
        if phases and name in PHASE_STAGES:  # each phase's precompute and train, in order, after train-vae
            if name == PHASE_STAGES[0] or PHASE_STAGES[0] not in names:
                _run_phases(phases, [n for n in names if n in PHASE_STAGES], profile, overrides, workdir, overwrite,
                            allow_partial, results)  # fmt: skip
            continue
        last = overrides + (phases[-1] if phases and name == "evaluate" else [])  # the last phase's run
        results[name] = TASKS[name](name, profile, last, workdir, overwrite, allow_partial)
    # For the Prefect UI; `ldm run` prints the same lines on the terminal once the flow has returned.
    create_markdown_artifact(f"```\n{report.closing_lines(cfg, tracking_uri(cfg), results)}\n```", key="pipeline")
    return results
