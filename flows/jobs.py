"""Run one stage on a Ray cluster as a Ray job, and follow it to its end.

The job's entrypoint is the direct path, `python -m flows.cli stage NAME ...`, so a job does exactly
what `ldm stage NAME` does. The job lives on the cluster, not in this process: if the flow's process
dies, the job goes on, and the next flow run follows the job still running for the same stage and
work directory instead of starting a second writer on the same output.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable

from flows.endpoints import dashboard_url, ray_headers
from ldm.config import PipelineConfig
from ldm.io.manifest import StageError
from ldm.ray_cluster import runtime_env
from ldm.stage import Workdir

ACTIVE = ("PENDING", "RUNNING")
POLL_S = 2.0
AGENT_WAIT_S = 120.0  # how long a submission waits for the head's job agent


def entrypoint(name: str, profile: str, overrides: list[str], workdir: str | None, flags: list[str]) -> str:
    """The shell command the job runs: the stage's direct path with this flow run's config.

    No RAY_ADDRESS here: Ray's job manager sets it for the entrypoint, so the stage joins the cluster the
    job runs on; overriding it with `auto` lost Ray Data's actors on a multi-node cluster (FIELD-NOTES).
    """
    args = ["python", "-m", "flows.cli", "stage", name, "--profile", profile, *flags]
    if workdir:
        args += ["--workdir", workdir]
    for item in overrides:
        args += ["--set", item]
    return shlex.join(args)


def job_url(address: str, submission_id: str) -> str:
    """The job's page on the Ray dashboard."""
    return f"{dashboard_url(address)}/#/jobs/{submission_id}"


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(dashboard_url(address), headers=ray_headers())


def _running_twin(client, metadata: dict[str, str]) -> str | None:
    """A job still running for the same stage, work directory and training run (left by a killed flow run)."""
    keys = ("ldm_stage", "ldm_workdir", "ldm_run")
    for job in client.list_jobs():
        meta = job.metadata or {}
        if str(job.status) in ACTIVE and all(meta.get(k) == metadata[k] for k in keys):
            return job.submission_id
    return None


def run_job(
    address: str,
    name: str,
    cfg: PipelineConfig,
    command: str,
    flow_run: str,
    log: Callable[[str], None],
) -> str:
    """Submit (or rejoin) the stage's job, stream its log through `log`, return its submission id.

    Raises StageError with the job's own last error line when the job fails or is stopped.
    """
    client = _client(address)
    wd = Workdir.of(cfg)
    metadata = {"ldm_stage": name, "ldm_workdir": wd.url, "ldm_run": cfg.train.run_id, "ldm_flow_run": flow_run}
    sid = _running_twin(client, metadata)
    if sid:
        log(f"{name}: following Ray job {sid}, still running from an earlier flow run: {job_url(address, sid)}")
    else:
        # Named by stage and flow run so the dashboard's job list reads as the pipeline; time keeps retries apart.
        sid = f"ldm-{name}-{flow_run[:8]}-{int(time.time())}"
        # The driver asks for CPUs, so Ray places it on a worker node: on a head with 0 CPUs (KubeRay's
        # prod shape) an entrypoint that asks for nothing runs on the head, beside the GCS and dashboard.
        _submit(client, entrypoint=command, submission_id=sid, metadata=metadata,
                runtime_env=runtime_env(cfg) or None, entrypoint_num_cpus=cfg.compute.job_cpus,
                entrypoint_resources=cfg.compute.job_resources or None)  # fmt: skip
        log(f"{name}: submitted Ray job {sid}: {job_url(address, sid)}")
    shown = 0
    while True:
        status = str(client.get_job_status(sid))
        text = client.get_job_logs(sid)
        for line in text[shown:].splitlines():
            log(line)
        shown = len(text)
        if status not in ACTIVE:
            break
        time.sleep(POLL_S)
    if status != "SUCCEEDED":
        info = client.get_job_info(sid)
        raise StageError(f"{name}: Ray job {sid} {status.lower()}: {_error_line(text) or info.message}")
    return sid


def _submit(client, wait_s: float = AGENT_WAIT_S, **job) -> None:
    """Submit, waiting out a head that is up but has no job agent yet (a restarted head: seconds to a minute)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            client.submit_job(**job)
            return
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(POLL_S)


def _error_line(logs: str) -> str:
    """The stage's own one-line error (`ldm: STAGE: ...`), the last line the CLI prints on failure."""
    lines = [ln for ln in logs.splitlines() if ln.startswith("ldm: ")]
    return lines[-1].removeprefix("ldm: ") if lines else ""
