"""MLflow tracking: one helper so every stage logs to the profile's store the same way."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

from ldm.config import PipelineConfig
from ldm.io import storage
from ldm.stage import Workdir, redirect_library_logs


def tracking_uri(cfg: PipelineConfig) -> str:
    """The profile's tracking URI, or a SQLite store in the work directory (in cwd for a remote workdir)."""
    if cfg.tracking.uri:
        return cfg.tracking.uri
    workdir = storage.normalize(cfg.workdir)
    if workdir.startswith("file://"):
        return f"sqlite:///{workdir.removeprefix('file://')}/mlflow.db"
    return f"sqlite:///{os.path.abspath('mlflow.db')}"


def artifact_root(cfg: PipelineConfig) -> str | None:
    """Where runs' artifacts go when this pipeline creates the experiment: W/mlartifacts for a local store, None
    (the server's choice) for a tracking server.

    A server decides where artifacts live: with --serve-artifacts (infra/k8s/mlflow.yaml) it stores them under
    its --artifacts-destination and hands out mlflow-artifacts:/ URIs, so clients need no S3 credentials of
    their own. An explicit location would send every client straight to that store instead.
    """
    if tracking_uri(cfg).startswith(("http://", "https://")):
        return None
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


class _Tracker:
    """The mlflow module, made unable to fail a stage: the first tracking error warns in one line and turns
    every later call into a no-op, so a tracking-server outage never discards a stage's finished work."""

    def __init__(self, mlflow: Any, stage: str, uri: str):
        self._mlflow, self._stage, self._uri, self.failed = mlflow, stage, uri, False

    def fail(self, e: BaseException) -> None:
        """Warn once, in one line, and stop tracking."""
        if not self.failed:
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            warnings.warn(
                f"{self._stage}: MLflow tracking at {self._uri} failed, the stage goes on untracked "
                f"({type(e).__name__}: {first})",
                stacklevel=3,
            )
        self.failed = True

    def active_run(self) -> Any:
        """The active run, or a stand-in whose run_id is None once tracking failed."""
        run = None if self.failed else self._call("active_run")
        return run if run is not None else SimpleNamespace(info=SimpleNamespace(run_id=None))

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        if self.failed:
            return None
        try:
            return getattr(self._mlflow, name)(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any tracking failure (HTTP, SQL, artifact store) is only a warning
            self.fail(e)
            return None

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: self._call(name, *args, **kwargs)


@contextlib.contextmanager
def mlflow_run(cfg: PipelineConfig, name: str, params: dict[str, Any] | None = None) -> Iterator[Any]:
    """Start an MLflow run named `name` in the profile's experiment, log params; yield the mlflow module.

    Tracking failures warn and are otherwise ignored (see _Tracker); errors of the stage's own work propagate.
    """
    import mlflow

    workdir = storage.normalize(cfg.workdir)
    if workdir.startswith("file://"):
        os.makedirs(workdir.removeprefix("file://"), exist_ok=True)
    tracker = _Tracker(mlflow, name, tracking_uri(cfg))
    started = False
    try:
        mlflow.set_tracking_uri(tracking_uri(cfg))
        experiment = mlflow.get_experiment_by_name(cfg.tracking.experiment)
        if experiment is None:
            experiment_id = mlflow.create_experiment(cfg.tracking.experiment, artifact_location=artifact_root(cfg))
        else:
            experiment_id = experiment.experiment_id
        mlflow.start_run(experiment_id=experiment_id, run_name=name)
        started = True
        mlflow.set_tag("stage", name)
        if params:
            mlflow.log_params({k: str(v)[:500] for k, v in _flatten(params).items()})
    except Exception as e:  # noqa: BLE001 - see _Tracker
        tracker.fail(e)
    redirect_library_logs()  # mlflow's loggers (set at its import) and alembic's (set when the store opened)
    status = "FAILED"
    try:
        yield tracker
        status = "FINISHED"
    finally:
        if started:
            try:
                mlflow.end_run(status)
            except Exception as e:  # noqa: BLE001 - see _Tracker
                tracker.fail(e)
