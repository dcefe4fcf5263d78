"""One plausible drift per check, planted in a copy of the bundle: test_manifests.py asserts each check fails on
its drift. Each drift's docstring is the bug it stands for."""

from __future__ import annotations

import copy
import re

from tests.infra import checks, envvars, monitoring, names
from tests.infra.bundle import Bundle, one, raycluster


def copy_of(b: Bundle) -> Bundle:
    """A deep copy whose file names still map (they are keyed by the documents' ids)."""
    c = copy.deepcopy(b)
    c.files = {id(d): b.files[id(o)] for d, o in zip(c.docs, b.docs, strict=True)}
    return c


def _text(b: Bundle, path: str, old: str, new: str, count: int = 1) -> None:
    assert old in b.texts[path], f"{path} no longer holds {old!r}: update the drift"
    b.texts[path] = b.texts[path].replace(old, new, count)


def _source(b: Bundle, path: str, old: str, new: str) -> None:
    assert old in b.sources[path], f"{path} no longer holds {old!r}: update the drift"
    b.sources[path] = b.sources[path].replace(old, new)


# --- the manifests' own consistency (checks.py) ---------------------------------------------------------


def _set_pool_image(b: Bundle) -> None:
    """The pool's default image pinned to another tag than the pods'."""
    b.pool["variables"]["properties"]["image"]["default"] = "ghcr.io/ldm-pipeline/ldm-pipeline:0.0.9"


def _rename_raycluster(b: Bundle) -> None:
    """The RayCluster renamed without the ConfigMap (its head service is named after it)."""
    raycluster(b)["metadata"]["name"] = "ldm-gpu"


def _move_mlflow_port(b: Bundle) -> None:
    """The MLflow Service's port moved without the tracking URI."""
    one(b, "Service", "mlflow")["spec"]["ports"][0]["port"] = 80


def _drop_secret_key(b: Bundle) -> None:
    """A Secret key a pod reads, dropped."""
    one(b, "Secret", "mlflow-postgres")["stringData"].pop("POSTGRES_DB")


def _rename_s3_key(b: Bundle) -> None:
    """The S3 key renamed to a name boto does not read."""
    keys = one(b, "Secret", "ldm-s3")["stringData"]
    keys["aws_access_key_id"] = keys.pop("AWS_ACCESS_KEY_ID")


def _swap_placeholders(b: Bundle) -> None:
    """Two placeholders swapped: the secret key filled with the key id."""
    one(b, "Secret", "ldm-s3")["stringData"]["AWS_SECRET_ACCESS_KEY"] = "${AWS_ACCESS_KEY_ID}"


def _paste_a_key(b: Bundle) -> None:
    """A real key pasted into the template."""
    one(b, "Secret", "ldm-s3")["stringData"]["AWS_SECRET_ACCESS_KEY"] = "wJalrXUtnFEMI/K7MDENG"


def _forget_token_export(b: Bundle) -> None:
    """The README's secrets step no longer exports RAY_AUTH_TOKEN: envsubst writes an empty cluster token."""
    _text(b, "infra/README.md", "RAY_AUTH_TOKEN=$(openssl rand -hex 32) ", "")


def _grow_object_store(b: Bundle) -> None:
    """An object store larger than /dev/shm."""
    raycluster(b)["spec"]["workerGroupSpecs"][0]["rayStartParams"]["object-store-memory"] = str(200 * 2**30)


def _other_namespace(b: Bundle) -> None:
    """One object in another namespace."""
    one(b, "Deployment", "mlflow")["metadata"]["namespace"] = "mlflow"


def _expose_dashboard(b: Bundle) -> None:
    """A public Ray dashboard."""
    raycluster(b)["spec"]["headGroupSpec"]["serviceType"] = "LoadBalancer"


def _more_workers(b: Bundle) -> None:
    """More training workers than the GPU groups hold."""
    b.prod["compute"]["num_workers"] = 64


def _unused_variable(b: Bundle) -> None:
    """A pool variable left unused."""
    b.pool["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]["resources"] = {}


def _bump_ray(b: Bundle) -> None:
    """Ray moved in the RayCluster only."""
    raycluster(b)["spec"]["rayVersion"] = "2.61.0"


def _bump_torch(b: Bundle) -> None:
    """torch moved in the Dockerfile only."""
    b.dockerfile = b.dockerfile.replace("torch==2.14.1", "torch==2.13.0")


def _prod_tracking_elsewhere(b: Bundle) -> None:
    """prod.yaml's tracking URI in another namespace than the server's."""
    b.prod["tracking"]["uri"] = "http://mlflow.mlflow.svc:5000"


def _drop_allowed_host(b: Bundle) -> None:
    """The MLflow server refusing its own service name."""
    c = one(b, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
    c["args"] = [a if not a.startswith("--allowed-hosts") else "--allowed-hosts=localhost:5000" for a in c["args"]]


def _run_as_root(b: Bundle) -> None:
    """A root image."""
    b.dockerfile += "\nUSER root\n"


def _ray_client_address(b: Bundle) -> None:
    """RAY_ADDRESS a ray:// client address, where the flow needs the job API."""
    checks.endpoints(b)["RAY_ADDRESS"] = "ray://ldm-ray-head-svc.ldm.svc.cluster.local:10001"


# --- the names the files share (names.py) ---------------------------------------------------------------


def _latest_in_a_comment(b: Bundle) -> None:
    """A `docker pull ...:latest` example: users copy it and run other code than the cluster's."""
    b.texts["prefect.yaml"] += "\n# docker pull ghcr.io/ldm-pipeline/ldm-pipeline:latest\n"


def _workdir_moved(b: Bundle) -> None:
    """The image's WORKDIR moved without prefect.yaml's pull step."""
    b.dockerfile = b.dockerfile.replace("WORKDIR /app", "WORKDIR /opt/ldm-pipeline")


def _bucket_in_reference(b: Bundle) -> None:
    """The evaluation reference in another bucket than the workdir's."""
    _text(b, "conf/prod.yaml", "s3://ldm-pipeline/eval/", "s3://ldm-prod/eval/")


def _example_service_name(b: Bundle) -> None:
    """An example URL naming a service that does not exist (KubeRay's sample cluster name)."""
    _text(b, "prefect.yaml", "ldm-ray-head-svc", "raycluster-ldm-head-svc")


def _grafana_selector_typo(b: Bundle) -> None:
    """A Service whose selector no pod matches (the Grafana Deployment's label spelt differently)."""
    one(b, "Service", "ldm-grafana")["spec"]["selector"] = {"app.kubernetes.io/name": "grafana"}


# --- environment variables (envvars.py) -----------------------------------------------------------------


def _unread_variable(b: Bundle) -> None:
    """A ConfigMap variable nothing reads (RAY_DASHBOARD_URL, as before)."""
    checks.endpoints(b)["RAY_DASHBOARD_URL"] = "http://ldm-ray-head-svc.ldm.svc.cluster.local:8265"


def _drop_ray_address(b: Bundle) -> None:
    """RAY_ADDRESS gone from the ConfigMap: the code reads it and the flow pod never gets it."""
    checks.endpoints(b).pop("RAY_ADDRESS")


def _deploy_time_env(b: Bundle) -> None:
    """An endpoint taken from the deployer's shell (`{{ $RAY_ADDRESS }}`), shadowing the ConfigMap."""
    b.prefect["deployments"][1]["work_pool"]["job_variables"]["env"]["RAY_ADDRESS"] = "{{ $RAY_ADDRESS }}"


def _unmount_token(b: Bundle) -> None:
    """The pool template no longer mounts the token that RAY_AUTH_TOKEN_PATH names."""
    spec = b.pool["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    mounts = spec["containers"][0]["volumeMounts"]
    mounts[:] = [m for m in mounts if m["mountPath"] != "/var/run/secrets/ray"]


def _other_token_secret(b: Bundle) -> None:
    """The RayCluster's token Secret renamed without the pool template's mount."""
    raycluster(b)["spec"]["authOptions"]["secretName"] = "ldm-ray-auth"


def _prod_ray_auto(b: Bundle) -> None:
    """prod.yaml's compute.ray_address back to `auto`: without RAY_ADDRESS the Ray stages run in the flow pod."""
    b.prod["compute"]["ray_address"] = "auto"


def _env_ignored_again(b: Bundle) -> None:
    """flows/endpoints.py ignoring MLFLOW_TRACKING_URI whenever the profile names a URI (the bug as found)."""
    _source(b, "flows/endpoints.py", "uri and uri != cfg.tracking.uri", "uri and not cfg.tracking.uri")


# --- monitoring (monitoring.py) -------------------------------------------------------------------------


def _worker_selector_typo(b: Bundle) -> None:
    """The workers' PodMonitor selecting `workers` (no such KubeRay node type): workers go unscraped."""
    one(b, "PodMonitor", "ray-workers-monitor")["spec"]["selector"]["matchLabels"]["ray.io/node-type"] = "workers"


def _grafana_datasource_port(b: Bundle) -> None:
    """Grafana's datasource on another port than RAY_PROMETHEUS_HOST's."""
    data = one(b, "ConfigMap", "ldm-grafana-provisioning")["data"]
    data["datasources.yaml"] = re.sub(r"9090", "9091", data["datasources.yaml"])


DRIFTS = [
    (checks.check_image, _set_pool_image),
    (checks.check_ray_endpoints, _rename_raycluster),
    (checks.check_ray_endpoints, _ray_client_address),
    (checks.check_mlflow_endpoints, _move_mlflow_port),
    (checks.check_mlflow_endpoints, _prod_tracking_elsewhere),
    (checks.check_mlflow_endpoints, _drop_allowed_host),
    (checks.check_references, _drop_secret_key),
    (checks.check_references, _rename_s3_key),
    (checks.check_no_credentials, _paste_a_key),
    (checks.check_no_credentials, _swap_placeholders),
    (checks.check_no_credentials, _run_as_root),
    (checks.check_secret_exports, _forget_token_export),
    (checks.check_ray_sizes, _grow_object_store),
    (checks.check_ray_sizes, _more_workers),
    (checks.check_namespace, _other_namespace),
    (checks.check_cluster_internal, _expose_dashboard),
    (checks.check_pool_variables, _unused_variable),
    (checks.check_versions, _bump_ray),
    (checks.check_versions, _bump_torch),
    (names.check_image_refs, _latest_in_a_comment),
    (names.check_workdir, _workdir_moved),
    (names.check_buckets, _bucket_in_reference),
    (names.check_services, _example_service_name),
    (names.check_services, _rename_raycluster),
    (names.check_services, _grafana_selector_typo),
    (envvars.check_env_read, _unread_variable),
    (envvars.check_env_endpoints_set, _drop_ray_address),
    (envvars.check_deploy_env, _deploy_time_env),
    (envvars.check_env_paths, _unmount_token),
    (envvars.check_ray_auth, _other_token_secret),
    (envvars.check_flow_endpoints, _env_ignored_again),
    (envvars.check_flow_endpoints, _prod_ray_auto),
    (monitoring.check_pod_monitors, _worker_selector_typo),
    (monitoring.check_pod_monitors, _rename_raycluster),
    (monitoring.check_grafana, _grafana_datasource_port),
]
