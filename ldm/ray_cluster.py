"""Connect to the profile's Ray cluster, or start a local one sized to this machine.

Nothing from this process's environment is sent to a remote cluster unless `compute.forward_env`
names it: a job's `runtime_env` is shown on the cluster's dashboard and kept in its job table, and
the cluster should reach S3 with its own credentials (IAM role, mounted secret). A locally started
cluster needs nothing sent: its processes are started from this one and inherit its environment.
"""

from __future__ import annotations

import os
import socket

from ldm.config import PipelineConfig
from ldm.io.manifest import StageError
from ldm.stage import redirect_library_logs


def check_reachable(address: str, timeout_s: float = 3.0) -> None:
    """Refuse a host:port Ray address nothing listens on (ray.init would retry it for minutes, then trace back)."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto", "local" or a form Ray resolves itself
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise StageError(
            f"cannot reach the Ray cluster at {address} (RAY_ADDRESS or compute.ray_address): {e.strerror or e}; "
            "start it (ray start --head) or unset both to start a local cluster"
        ) from None


def runtime_env(cfg: PipelineConfig) -> dict:
    """The runtime_env for a remote cluster: only the set variables that compute.forward_env names."""
    env_vars = {k: os.environ[k] for k in cfg.compute.forward_env if k in os.environ}
    return {"env_vars": env_vars} if env_vars else {}


def ensure_ray(cfg: PipelineConfig, object_store_mb: int = 512) -> dict:
    """Initialise Ray once per process: RAY_ADDRESS or compute.ray_address if set, else a local cluster.

    Returns the cluster's resources. On an existing cluster the job shows up on its dashboard.
    """
    import ray
    import ray.data  # noqa: F401 - configures Ray's and Ray Data's loggers at import: import, then redirect them

    redirect_library_logs()  # Ray's start-up lines and Ray Data's execution plans go to the stage's log
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS") or cfg.compute.ray_address
        if address:
            check_reachable(address)
            # Inside a Ray job the job's runtime_env already holds what compute.forward_env sent (flows.jobs);
            # a second one for the same variables is refused by Ray as a conflict.
            env = {} if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") else runtime_env(cfg)
            if env:  # names only: the values stay out of logs
                print(f"ray: sending {', '.join(sorted(env['env_vars']))} to the cluster (compute.forward_env)")
            ray.init(address=address, runtime_env=env or None, log_to_driver=False)
        else:
            ray.init(
                address="local",  # a new cluster: never attach to one a stale /tmp/ray/ray_current_cluster names
                num_cpus=os.cpu_count(),
                num_gpus=None if cfg.compute.use_gpu else 0,
                object_store_memory=object_store_mb * 1024 * 1024,
                include_dashboard=False,
                log_to_driver=False,
            )
    return ray.cluster_resources()


def actor_pool(cfg: PipelineConfig, configured: int | None, units: int) -> tuple[int, dict]:
    """(actors, resources per actor) for a stage's pool of model actors: one per GPU on GPUs, else one per CPU.

    Counted from what is free now, not the cluster's total: inside a Ray job the driver already holds its
    CPUs, and a fixed-size pool larger than what can be placed would wait forever. Never more actors
    than units of work (shards): an idle actor would only load its models.
    """
    import ray

    free = ray.available_resources()
    if cfg.compute.use_gpu:
        actors, res = configured or max(1, int(free.get("GPU", 1))), {"num_gpus": 1, "num_cpus": 1}
    else:
        actors, res = configured or max(1, int(free.get("CPU", 1))), {"num_cpus": 1}
    # Ray Data places a pool's actors with SPREAD itself (DataContext.scheduling_strategy; passing it is
    # deprecated): a node's loss takes the fewest actors with it.
    return max(1, min(actors, units)), res
