"""The train-ldm flow in-process (`ldm run`, Prefect's ephemeral API): bad input refused up front, a killed
flow run resumed without redoing finished stages, and no planted credential in anything the run writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from flows import endpoints
from ldm.io.manifest import INTENT, MANIFEST
from tests.helpers import free_port, make_config

ROOT = Path(__file__).resolve().parents[2]
SECRET = "PLANTED-SECRET-456"
PLANTED = {"AWS_SECRET_ACCESS_KEY": SECRET, "AWS_SESSION_TOKEN": SECRET + "-token", "MLFLOW_TRACKING_TOKEN": SECRET}


def _env(tmp_path: Path, **extra: str) -> dict:
    # Each test's ephemeral Prefect database lives in its own folder, not the user's ~/.prefect.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_HOME": str(tmp_path / "prefect"), **extra}
    for k in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "PREFECT_API_URL"):
        env.pop(k, None)
    return env


def _ldm(tmp_path: Path, *args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=tmp_path, env=env or _env(tmp_path),
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def test_unreachable_endpoints_fail_fast_naming_them(tmp_path, monkeypatch):
    """Bug caught: a dead Ray, MLflow or S3 endpoint found only inside a stage, minutes in (Ray retries a dead
    address for minutes), or reported without saying which endpoint."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    dead = f"http://127.0.0.1:{free_port()}"
    cases = [
        (make_config(tmp_path, f"compute.ray_address={dead}"), r"Ray dashboard \(job API\)"),
        (make_config(tmp_path, f"tracking.uri={dead}"), "MLflow tracking server"),
    ]
    for cfg, what in cases:
        with pytest.raises(Exception, match=f"{what} at {dead}"):
            endpoints.check(cfg, ["ingest", "precompute"])
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    with pytest.raises(Exception, match=f"S3 endpoint at {dead}"):
        endpoints.check(make_config("s3://bucket/w"), ["ingest"])
    # The same check ends the whole flow run before its first stage, in one line naming the endpoint.
    # The work directory is two folders that do not exist yet, as on a fresh clone (no work/): bug caught,
    # Prefect's ephemeral API failing to create its home there and the run dying before the flow started.
    workdir = tmp_path / "fresh" / "w"
    env = _env(tmp_path)
    del env["PREFECT_HOME"]  # as a user runs it: the ephemeral API's home goes under the work directory
    done = _ldm(tmp_path, "run", "--profile", "test", "--workdir", str(workdir), "--set",
                f"compute.ray_address={dead}", env=env)  # fmt: skip
    errors = [line for line in done.stderr.splitlines() if line.startswith("ldm: ")]
    assert done.returncode == 1 and len(errors) == 1 and f"Ray dashboard (job API) at {dead}" in errors[0], errors
    assert not (workdir / "raw").exists() and (workdir / ".prefect").is_dir()


PROBE = """
import json, sys
from flows.flow import train_ldm
out = {}
for name, kwargs in json.loads(sys.argv[1]).items():
    try:
        train_ldm(**kwargs)
        out[name] = "ran"
    except Exception as e:
        out[name] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"""


def test_flow_refuses_bad_parameters_before_any_stage(tmp_path):
    """Bug caught: a flow that starts ingest before validating its parameters (an unknown profile, a config
    value of the wrong type, a parameter of the wrong type), or fails without naming the field."""
    w = str(tmp_path / "w")
    cases = {
        "profile": {"profile": "nope", "workdir": w},
        "override": {"profile": "test", "workdir": w, "overrides": ["train.steps=many"]},
        "param": {"profile": "test", "workdir": w, "stages": 5},
        "stage": {"profile": "test", "workdir": w, "stages": ["ingest", "trian"]},
    }
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(cases)], cwd=tmp_path, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["profile"].startswith("ConfigError: profile: unknown profile 'nope'")
    assert out["override"].startswith("ConfigError: train.steps:")
    assert "stages" in out["param"] and out["param"].startswith("ParameterTypeError")
    assert out["stage"].startswith("ConfigError: stages: unknown stage 'trian'")
    assert not (tmp_path / "w" / "raw").exists()


@pytest.mark.slow
def test_a_killed_flow_run_resumes_without_redoing_finished_stages(tmp_path):
    """Bug caught: a flow that reruns every stage from the start after a kill (ingest downloads again), or one
    that trusts a half-written output (train-clip killed mid-stage is taken as done)."""
    w = tmp_path / "w"
    args = ["run", "--profile", "test", "--workdir", str(w), "--stages", "ingest", "train-clip",
            "--set", "clip.epochs=10"]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=tmp_path, env=_env(tmp_path),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    clip = w / "models" / "clip"
    try:
        while not (clip / INTENT).exists():  # train-clip has begun: ingest is finished
            assert proc.poll() is None, "the flow ended before train-clip began"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the flow's process, its ephemeral API and the stage's children
        proc.wait()
    assert not (clip / MANIFEST).exists(), "train-clip finished before the kill: the test proved nothing"
    ingest_manifest = (w / "raw" / MANIFEST).read_bytes()
    done = _ldm(tmp_path, *args)
    assert done.returncode == 0, done.stderr[-3000:]
    log = done.stdout + done.stderr
    assert "ingest: skipped" in log and "train-clip: skipped" not in log
    assert (w / "raw" / MANIFEST).read_bytes() == ingest_manifest  # not redone
    assert (clip / MANIFEST).exists()
    assert f"train-clip       file://{clip}" in log  # the closing lines say where every output is


READ_PREFECT = """
import asyncio, json
from prefect.client.orchestration import get_client

async def main():
    async with get_client() as client:
        artifacts = await client.read_artifacts()
        logs = await client.read_logs()
        runs = await client.read_flow_runs()
    print(json.dumps({"artifacts": [a.data for a in artifacts], "logs": [l.message for l in logs],
                      "runs": [r.model_dump(mode="json") for r in runs]}))

asyncio.run(main())
"""


@pytest.mark.slow
def test_a_planted_credential_is_in_no_config_dump_mlflow_param_prefect_artifact_or_log(tmp_path):
    """Bug caught: a flow that logs its environment, a task whose artifact or log echoes a credential
    (a tracking URI or S3 options with the key in them), or a flow run whose recorded parameters carry one."""
    w = tmp_path / "w"
    env = _env(tmp_path, **PLANTED)
    common = ["--profile", "test", "--workdir", str(w)]
    dump = _ldm(tmp_path, "config", "show", *common, env=env)
    run = _ldm(tmp_path, "run", *common, "--stages", "ingest", "train-clip", "--set", "clip.epochs=1", env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert SECRET not in dump.stdout + run.stdout + run.stderr
    client = mlflow.MlflowClient(f"sqlite:///{w}/mlflow.db")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert runs
    assert all(SECRET not in json.dumps([r.data.params, r.data.tags, r.info.run_name]) for r in runs)
    read = subprocess.run([sys.executable, "-c", READ_PREFECT], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert read.returncode == 0, read.stderr[-3000:]
    prefect = json.loads(read.stdout.strip().splitlines()[-1])
    assert len(prefect["artifacts"]) == 3 and any("ingest summary" in m for m in prefect["logs"])
    assert SECRET not in json.dumps(prefect)


# The `ldm` console script exactly as pip installs it: the entry point declared in pyproject, loaded and called.
LDM_SCRIPT = (
    "import sys; from importlib.metadata import entry_points; "
    "(ep,) = entry_points(group='console_scripts', name='ldm'); sys.exit(ep.load()())"
)


def _ldm_script(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", LDM_SCRIPT, *args], cwd=tmp_path, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=900)  # fmt: skip


@pytest.mark.slow
def test_ldm_run_end_to_end_refuses_a_changed_config_and_overwrite_redoes_that_stage_and_later_ones(tmp_path):
    """`ldm run` through the console script on the cheap early stages, three times.

    Bugs caught: a stage error inside the flow leaving the process with status 0 (or a traceback instead of one
    line); a changed config silently "up to date" or silently replacing output without --overwrite; --overwrite
    redoing stages before the changed one (ingest downloads again) or not redoing the stages after it (a
    train-aesthetic scored on the old CLIP's embeddings, its identity still naming the old CLIP).
    """
    w = tmp_path / "w"
    stages = ["--stages", "ingest", "train-clip", "train-aesthetic"]
    common = ["run", "--profile", "test", "--workdir", str(w), *stages, "--set", "aesthetic.epochs=2"]
    first = _ldm_script(tmp_path, *common, "--set", "clip.epochs=1")
    assert first.returncode == 0, first.stderr[-3000:]
    outputs = {"ingest": w / "raw", "train-clip": w / "models" / "clip", "train-aesthetic": w / "models" / "aesthetic"}
    before = {name: json.loads((out / MANIFEST).read_text()) for name, out in outputs.items()}
    assert before["train-aesthetic"]["inputs"]["train-clip"] == before["train-clip"]["config_hash"]

    refused = _ldm_script(tmp_path, *common, "--set", "clip.epochs=2")
    assert refused.returncode == 1
    # Prefect's own log lines (its record of the failed task without the traceback) come first; the
    # user's answer is the one line the CLI prints last.
    errors = [line for line in refused.stderr.splitlines() if line.startswith("ldm: ")]
    assert len(errors) == 1 and refused.stderr.strip().splitlines()[-2:].count(errors[0]) == 1, refused.stderr[-3000:]
    assert str(outputs["train-clip"]) in errors[0] and "--overwrite" in errors[0]
    # Bug caught: Prefect's console record of the failed task printing its traceback above that line.
    assert "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert {n: json.loads((o / MANIFEST).read_text()) for n, o in outputs.items()} == before  # nothing touched

    redone = _ldm_script(tmp_path, *common, "--set", "clip.epochs=2", "--overwrite")
    assert redone.returncode == 0, redone.stderr[-3000:]
    after = {name: json.loads((out / MANIFEST).read_text()) for name, out in outputs.items()}
    assert after["ingest"] == before["ingest"]  # before the changed stage: kept, not downloaded again
    assert after["train-clip"]["config"]["clip"]["epochs"] == 2
    for name in ("train-clip", "train-aesthetic"):  # the changed stage and the one after it: redone
        assert after[name]["config_hash"] != before[name]["config_hash"], name
        assert after[name]["finished"] > before["train-clip"]["finished"], name
    assert after["train-aesthetic"]["inputs"]["train-clip"] == after["train-clip"]["config_hash"]
    assert not any(p.name.endswith(".next") for p in (w / "models").iterdir())
