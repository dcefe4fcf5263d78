"""No credential leaves this process unless the user names it, and none is written anywhere we write.

A secret is planted in the environment of real runs (a real Ray cluster, the real CLI on the test
profile) and then looked for in what the Ray job ships, the work directory, the MLflow store, the
config dump and the CLI's own output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow

ROOT = Path(__file__).resolve().parents[2]
SECRET = "PLANTED-SECRET-123"
PLANTED = {"AWS_SECRET_ACCESS_KEY": SECRET, "AWS_SESSION_TOKEN": SECRET + "-token", "FSSPEC_S3_SECRET": SECRET}


def _env(**extra: str) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), **PLANTED, **extra}


def test_ray_jobs_ship_no_credential_unless_named(tmp_path):
    """Bug caught: every AWS_*/FSSPEC_* variable goes into the Ray runtime_env, so a remote cluster
    that RAY_ADDRESS names (its dashboard, its job table) receives this machine's credentials.

    A locally started cluster must still see them (inherited, nothing shipped); a driver attached by
    address ships nothing by default and exactly the variables compute.forward_env names.
    """
    probe = [sys.executable, "-m", "tests.ldm.ray_env_probe", str(tmp_path)]
    attached = [*probe, "--set", "compute.forward_env=[LDM_FORWARD_ME]"]
    names = ",".join([*PLANTED, "LDM_FORWARD_ME"])
    env = _env(LDM_PROBE_VARS=names, LDM_PROBE_ATTACH=json.dumps(attached), LDM_FORWARD_ME="opted-in")
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(probe, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert SECRET not in json.dumps(out["runtime_env"]), out["runtime_env"]
    assert {k: out["task_env"][k] for k in PLANTED} == PLANTED  # local cluster: inherited
    remote = out["attached"]
    assert SECRET not in json.dumps(remote["runtime_env"]), remote["runtime_env"]
    assert remote["runtime_env"].get("env_vars") == {"LDM_FORWARD_ME": "opted-in"}
    assert remote["task_env"]["LDM_FORWARD_ME"] == "opted-in"


def _files_holding(root: Path, needle: bytes) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_a_planted_credential_appears_in_no_output(tmp_path):
    """Bug caught: a stage that dumps its environment, or the whole config with a credential in it,
    into a manifest, a log, an MLflow param or tag, the config dump or the terminal."""
    workdir = tmp_path / "w"
    common = ["--profile", "test", "--workdir", str(workdir)]
    printed = ""
    for args in (["config", "show"], ["stage", "ingest"], ["stage", "train-clip", "--set", "clip.epochs=1"]):
        done = subprocess.run(
            [sys.executable, "-m", "flows.cli", *args, *common],
            cwd=tmp_path,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        printed += done.stdout + done.stderr
    assert "ingest" in printed and SECRET not in printed
    assert _files_holding(workdir, SECRET.encode()) == []
    client = mlflow.MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert runs  # train-clip logged a run
    for r in runs:
        assert SECRET not in json.dumps([r.data.params, r.data.tags, r.info.run_name])
