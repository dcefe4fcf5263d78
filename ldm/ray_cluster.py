"""Connect to the profile's Ray cluster, or start a local one sized to this machine."""

from __future__ import annotations

import os
import socket

from ldm.config import PipelineConfig
from ldm.io.manifest import StageError


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


def ensure_ray(cfg: PipelineConfig, object_store_mb: int = 512) -> dict:
    """Initialise Ray once per process: RAY_ADDRESS or compute.ray_address if set, else a local cluster.

    Returns the cluster's resources. On an existing cluster the job shows up on its dashboard.
    """
    import ray

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS") or cfg.compute.ray_address
        env = {"env_vars": {k: v for k, v in os.environ.items() if k.startswith(("AWS_", "FSSPEC_"))}}
        if address:
            check_reachable(address)
            ray.init(address=address, runtime_env=env, log_to_driver=False)
        else:
            ray.init(
                address="local",  # a new cluster: never attach to one a stale /tmp/ray/ray_current_cluster names
                num_cpus=os.cpu_count(),
                num_gpus=None if cfg.compute.use_gpu else 0,
                object_store_memory=object_store_mb * 1024 * 1024,
                include_dashboard=False,
                log_to_driver=False,
                runtime_env=env,
            )
    return ray.cluster_resources()
