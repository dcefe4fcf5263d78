"""A small real stage for tests/ldm/test_stage_log.py: Ray Data over a local Ray cluster plus an MLflow run.

It makes the chatter the stage protocol must keep off the terminal (Ray's start-up, Ray Data's execution
plans and progress, MLflow's and alembic's store set-up, a urllib3 warning) without the cost of precompute.
"""

from __future__ import annotations

import logging

from ldm.ray_cluster import ensure_ray
from ldm.stage import StageRun
from ldm.tracking import mlflow_run


def double(batch: dict) -> dict:
    """A Ray Data batch function."""
    return {"id": batch["id"] * 2}


def work(run: StageRun) -> dict:
    """Run a 20-block Ray Data pipeline and log its total to MLflow; the manifest's fields."""
    import ray

    run.begin()
    ensure_ray(run.cfg, 128)
    try:
        ds = ray.data.range(2000, override_num_blocks=20).map_batches(double, batch_size=100)
        total = int(sum(row["id"] for row in ds.iter_rows()))
    finally:
        ray.shutdown()
    with mlflow_run(run.cfg, "chatter") as mlflow:
        mlflow.log_metric("total", total)
    logging.getLogger("urllib3.connectionpool").warning("Retrying (chatter from urllib3)")
    return {"total": total}


def summary(m: dict) -> str:
    """The stage's one-line summary."""
    return f"chatter summary: total {m['total']}"
