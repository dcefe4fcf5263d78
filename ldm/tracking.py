"""MLflow tracking: one helper so every stage logs to the profile's store the same way."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from ldm.config import PipelineConfig
from ldm.io import storage
from ldm.stage import Workdir


def tracking_uri(cfg: PipelineConfig) -> str:
    """The profile's tracking URI, or a SQLite store in the work directory (in cwd for a remote workdir)."""
    if cfg.tracking.uri:
        return cfg.tracking.uri
    workdir = storage.normalize(cfg.workdir)
    if workdir.startswith("file://"):
        return f"sqlite:///{workdir.removeprefix('file://')}/mlflow.db"
    return f"sqlite:///{os.path.abspath('mlflow.db')}"


def artifact_root(cfg: PipelineConfig) -> str:
    """Where runs' artifacts go when this pipeline creates the experiment: W/mlartifacts."""
    return Workdir.of(cfg).mlartifacts


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


@contextlib.contextmanager
def mlflow_run(cfg: PipelineConfig, name: str, params: dict[str, Any] | None = None) -> Iterator[Any]:
    """Start an MLflow run named `name` in the profile's experiment, log params; yield the mlflow module."""
    import mlflow

    workdir = storage.normalize(cfg.workdir)
    if workdir.startswith("file://"):
        os.makedirs(workdir.removeprefix("file://"), exist_ok=True)
    mlflow.set_tracking_uri(tracking_uri(cfg))
    experiment = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    if experiment is None:
        experiment_id = mlflow.create_experiment(cfg.tracking.experiment, artifact_location=artifact_root(cfg))
    else:
        experiment_id = experiment.experiment_id
    with mlflow.start_run(experiment_id=experiment_id, run_name=name):
        mlflow.set_tag("stage", name)
        if params:
            mlflow.log_params({k: str(v)[:500] for k, v in _flatten(params).items()})
        yield mlflow
