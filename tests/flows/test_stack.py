"""The local stack end to end: `ldm stack up`, `prefect deployment run train-ldm/local` through the worker,
then every claim checked through the services' own APIs, and `ldm stack down` leaving no process behind.

Bugs this catches: a deployment whose entrypoint or pull step does not resolve from the worker; a flow that
runs the Ray stages in the worker's process instead of as jobs on the stack's head (the dashboard would list
none); a task that swallows a stage failure (a task run not COMPLETED); a stage without its artifact; training
or evaluation logging somewhere other than the stack's MLflow server; a `down` that leaves Ray's raylet or the
worker's flow-run subprocess running; a deployment parameter of the wrong type that is only found in a stage;
an `up` that does not create the bucket the README's example writes to (moto starts empty: the run would fail at
once with "the bucket does not exist"); a bucket creation that fails when the bucket is there already.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from flows import stack
from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[2]
# The test profile, smaller where only the plumbing is under test (the stages' own tests check their numbers).
FAST = [
    "clip.epochs=4",
    "aesthetic.epochs=20",
    "filter.aesthetic_min=0",
    "vae.steps=20",
    "train.steps=2",
    "train.checkpoint_every=2",
    "train.log_every=1",
    "evaluate.prompt_count=6",
    "evaluate.batch_size=6",
]


def _cli(*args: str, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _deployment_run(params: dict, env: dict, *extra: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`prefect deployment run train-ldm/local` with these parameters, as a user types it."""
    args = ["deployment", "run", "train-ldm/local", "--params", json.dumps(params), *extra]
    return _cli(sys.executable, "-m", "prefect", *args, env=env, timeout=timeout)


@pytest.mark.slow
def test_stack_runs_the_deployment_end_to_end(tmp_path):
    base = tmp_path / "stack"
    ports = {name: free_port() for name in stack.DEFAULT_PORTS}
    spec = ",".join(f"{k}={v}" for k, v in ports.items())
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    up = _cli(sys.executable, "-m", "flows.cli", "stack", "up", "--dir", str(base), "--ports", spec, env=env)
    state = stack.load(base)
    try:
        assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-3000:]
        urls = stack.urls(ports)
        assert all(u in up.stdout for u in urls.values())  # every URL printed
        status = _cli(sys.executable, "-m", "flows.cli", "stack", "status", "--dir", str(base), env=env)
        assert status.returncode == 0, status.stdout + status.stderr
        client_env = {**env, **stack.client_env(state)}
        # `up` made the README's bucket (no test-side setup) and said so; making it again changes nothing.
        assert f"s3://{stack.BUCKET}" in up.stdout
        assert _bucket_exists(urls["s3"])
        stack.make_bucket(state)
        assert _bucket_exists(urls["s3"])

        # A wrong parameter type is refused when the run is created, naming the field, before any stage.
        bad = _deployment_run({"stages": 5}, client_env, timeout=120)
        assert bad.returncode != 0 and "stages" in bad.stdout + bad.stderr, bad.stdout + bad.stderr

        # The README's example's parameters (its bucket), plus the smaller overrides.
        params = {**_readme_params(), "overrides": FAST}
        assert params["workdir"] == f"s3://{stack.BUCKET}/w"
        run = _deployment_run(params, client_env, "--watch", "--watch-timeout", "480")
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:] + _tail(base / "logs" / "worker.log")
        _check_prefect(urls["prefect"])
        _check_mlflow(urls["mlflow"])
        _check_ray_jobs(urls["ray"], Path(state["ray_token_path"]).read_text().strip())
    finally:
        down = _cli(sys.executable, "-m", "flows.cli", "stack", "down", "--dir", str(base), env=env)
    assert down.returncode == 0, down.stdout + down.stderr
    assert state is not None
    assert stack.stack_pids(state) == []


def _tail(path: Path) -> str:
    return path.read_text()[-3000:] if path.exists() else ""


def _bucket_exists(endpoint: str) -> bool:
    import s3fs

    fs = s3fs.S3FileSystem(
        key="stack", secret="stack", client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True
    )
    return stack.BUCKET in [b.rstrip("/") for b in fs.ls("")]


def _readme_params() -> dict:
    """The `--params` of the README's local-stack example, as a user copies it."""
    section = (ROOT / "README.md").read_text().split("### The local stack", 1)[1].split("\n### ", 1)[0]
    (line,) = [ln for ln in section.splitlines() if ln.startswith("prefect deployment run") and "--params" in ln]
    return json.loads(line.split("--params '", 1)[1].split("'", 1)[0])


def _check_prefect(api: str) -> None:
    """The flow run and every task run COMPLETED; one markdown artifact per stage."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def read():
        async with get_client() as client:
            runs = await client.read_flow_runs()
            (flow_run,) = [r for r in runs if r.state_type.value == "COMPLETED"]
            tasks = await client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [flow_run.id]}))
            artifacts = await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id]))
            )
            return flow_run, tasks, artifacts

    with temporary_settings({PREFECT_API_URL: f"{api}/api"}):
        flow_run, tasks, artifacts = asyncio.run(read())
    stages = ["ingest", "train-clip", "train-aesthetic", "filter", "train-vae", "precompute", "train", "evaluate"]
    assert sorted(t.name for t in tasks) == sorted(stages)
    assert {t.name: t.state_type.value for t in tasks} == dict.fromkeys(stages, "COMPLETED")
    assert sorted(a.key for a in artifacts) == sorted(["pipeline", *(f"stage-{s}" for s in stages)])
    train = next(a for a in artifacts if a.key == "stage-train").data
    assert "ldm-train-" in train and "/#/jobs/" in train and "#/experiments/" in train  # Ray job + MLflow run links


def _check_mlflow(uri: str) -> None:
    """The training run, its evaluation child runs and a registered model version, on the stack's server."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("ldm-pipeline")
    runs = client.search_runs([experiment.experiment_id])
    (train,) = [r for r in runs if r.info.run_name == "train/test"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == train.info.run_id]
    assert len(children) >= 2 and all(c.info.status == "FINISHED" for c in children)
    assert client.search_model_versions("name='ldm-pipeline'")


def _check_ray_jobs(dashboard: str, token: str) -> None:
    """The dashboard's job API (token auth) lists every Ray stage (ingest to evaluate, not the trainers of
    CLIP, MLP and VAE), each SUCCEEDED."""
    req = urllib.request.Request(f"{dashboard}/api/jobs/", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        jobs = json.loads(r.read())
    by_stage = {j["metadata"].get("ldm_stage"): j for j in jobs if j.get("metadata")}
    expected = {"ingest", "filter", "precompute", "train", "evaluate"}
    assert set(by_stage) == expected, [j.get("submission_id") for j in jobs]
    for name, job in by_stage.items():
        assert job["status"] == "SUCCEEDED" and job["submission_id"].startswith(f"ldm-{name}-")
