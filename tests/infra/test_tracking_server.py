"""ldm.tracking against a real MLflow server that serves artifacts, started the way infra/k8s/mlflow.yaml starts it
(--serve-artifacts, --artifacts-destination), on 127.0.0.1 with a SQLite store and a folder for a bucket."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.helpers import free_port, make_config


@pytest.fixture
def server(tmp_path):
    """(tracking URI, artifacts destination) of a running `mlflow server --serve-artifacts`."""
    port, dest = free_port(), tmp_path / "destination"
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{tmp_path}/mlflow.db", "--serve-artifacts",
           "--artifacts-destination", dest.as_uri()]  # fmt: skip
    env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job-runner processes: tracking only
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        for _ in range(1200):  # up to 5 minutes: the server takes over a minute on a loaded 2-core machine
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=1).read()
                break
            except OSError:
                assert proc.poll() is None, "mlflow server exited"
                time.sleep(0.25)
        yield uri, dest
    finally:  # the server and the uvicorn process it starts: its whole session
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.mark.slow
def test_runs_keep_their_artifacts_on_the_server(server, tmp_path, monkeypatch):
    """Bug caught: the pipeline creating its experiment with an artifact location of its own (the work directory's
    mlartifacts/), so every client writes there directly, with storage credentials of its own, and the server's
    --artifacts-destination (prod: s3://ldm-pipeline/mlflow-artifacts) never sees the runs' files."""
    from mlflow.tracking import MlflowClient

    from ldm.tracking import mlflow_run

    uri, dest = server
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = make_config(tmp_path / "work", f"tracking.uri={uri}")
    with mlflow_run(cfg, "probe") as mlflow:
        mlflow.log_text("through the server", "probe.txt")
        run_id = mlflow.active_run().info.run_id
    assert run_id, "tracking failed (a warning says why)"
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/"), run.info.artifact_uri
    stored = list(dest.rglob("probe.txt"))
    assert len(stored) == 1 and stored[0].read_text() == "through the server"
    assert not (tmp_path / "work" / "mlartifacts").exists()
