"""The endpoints a flow run talks to (Ray, MLflow, S3): read from the config or the environment, checked up front.

An unreachable endpoint fails the flow run before any stage starts, in one line naming the endpoint and
where it came from, rather than minutes later inside a stage (Ray retries a dead address for minutes).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

from ldm.config import PipelineConfig
from ldm.io import storage
from ldm.io.manifest import StageError

RAY_STAGES = ("ingest", "filter", "precompute", "train", "evaluate")  # the stages that run on a Ray cluster
DASHBOARD_PORT = 8265  # Ray's default; an address given as host:port (GCS) or ray://host:port maps to it


def env_overrides(cfg: PipelineConfig) -> list[str]:
    """Config overrides taken from the environment: MLFLOW_TRACKING_URI, when set, as tracking.uri.

    The environment wins over the profile, as RAY_ADDRESS does over compute.ray_address (on the cluster both
    come from infra's ConfigMap); put before the user's --set overrides, which win over both. RAY_ADDRESS and
    AWS_ENDPOINT_URL need none: ldm.ray_cluster, this module and s3fs read them themselves.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    return [f"tracking.uri={uri}"] if uri and uri != cfg.tracking.uri else []


def ray_address(cfg: PipelineConfig) -> str | None:
    """The Ray cluster the Ray stages are sent to as jobs (RAY_ADDRESS, else compute.ray_address), or None.

    None ("", "local" or "auto") runs them in this process: "auto" joins a cluster running on this machine, if
    any, as ray.init does; a remote cluster is named by its dashboard URL (see dashboard_url).
    """
    address = os.environ.get("RAY_ADDRESS") or cfg.compute.ray_address
    return None if address in (None, "", "auto", "local") else address


def dashboard_url(address: str) -> str:
    """The dashboard (job API) URL of a Ray address: an http(s) URL as given, else http://host:8265."""
    if address.startswith(("http://", "https://")):
        return address.rstrip("/")
    host = address.removeprefix("ray://").rpartition(":")[0] or address.removeprefix("ray://")
    return f"http://{host}:{DASHBOARD_PORT}"


def ray_token() -> str | None:
    """The Ray cluster's auth token, where Ray itself looks: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    return path.read_text().strip() if path.is_file() else None


def ray_headers() -> dict[str, str]:
    """HTTP headers for the dashboard's API (it answers 401 without the token when token auth is on)."""
    token = ray_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def _host_port(url: str, default_port: int) -> tuple[str, int]:
    parts = urlsplit(url if "://" in url else f"tcp://{url}")
    return parts.hostname or "127.0.0.1", parts.port or default_port


def _reach(url: str, default_port: int, what: str, fix: str, timeout_s: float = 3.0) -> None:
    host, port = _host_port(url, default_port)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as e:
        raise StageError(f"cannot reach the {what} at {url}: {e.strerror or e}; {fix}") from None


def check(cfg: PipelineConfig, stages: list[str]) -> None:
    """Refuse, before any stage runs, an endpoint the run needs that nothing answers on (StageError naming it)."""
    address = ray_address(cfg)
    if address and any(s in RAY_STAGES for s in stages):
        _reach(dashboard_url(address), DASHBOARD_PORT, "Ray dashboard (job API)",
               "start the cluster or fix RAY_ADDRESS / compute.ray_address")  # fmt: skip
    uri = cfg.tracking.uri or ""
    if uri.startswith(("http://", "https://")):
        _reach(uri, 443 if uri.startswith("https") else 80, "MLflow tracking server",
               "start it or fix MLFLOW_TRACKING_URI / tracking.uri")  # fmt: skip
    if storage.normalize(cfg.workdir).startswith("s3://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"
        _reach(endpoint or f"https://s3.{region}.amazonaws.com", 443, "S3 endpoint",
               "start it or fix AWS_ENDPOINT_URL")  # fmt: skip
