"""infra/ validated offline: built-in kinds against Kubernetes' schemas (kubernetes-validate ships them), the
RayCluster against KubeRay's CRD schema, the Prefect pool template rendered to a Job, and the names, ports,
images and environment variables that refer to each other checked to agree (tests/infra/checks.py).

Each consistency check also runs on a copy of the files with one plausible drift planted, so a check that
could never fail would fail here.
"""

from __future__ import annotations

import copy
import json

import jsonschema
import kubernetes_validate
import pytest

from tests.infra import checks
from tests.infra.checks import INFRA, Bundle

K8S_VERSION = "1.31.0"  # the oldest minor still in the big clouds' standard support (EKS, GKE, AKS)
CRD_KINDS = {"RayCluster"}


@pytest.fixture(scope="module")
def bundle() -> Bundle:
    """infra/ as read from disk."""
    return checks.load()


def k8s_validate(doc: dict) -> None:
    """Validate a built-in object strictly (unknown fields refused); one-line error naming the object."""
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        where = "/".join(str(p) for p in e.path)
        raise AssertionError(f"{doc['kind']} {doc['metadata'].get('name')}: {where}: {e.message}") from None


def test_builtin_kinds_validate(bundle):
    """Bugs: a misspelt field (`containerport`, `sizelimit`) that the API server would reject or prune, a port
    given as a string, a Secret's stringData that is not a map of strings."""
    kinds = set()
    for doc in bundle.docs:
        if doc["kind"] not in CRD_KINDS:
            k8s_validate(doc)
            kinds.add(doc["kind"])
    assert {"Namespace", "ConfigMap", "Secret", "Service", "Deployment", "StatefulSet"} <= kinds


def test_builtin_validation_catches_a_typo(bundle):
    """The validator really is strict: the same Deployment with `containerport` is refused."""
    dep = copy.deepcopy(checks.one(bundle, "Deployment", "mlflow"))
    dep["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerport"] = 5000
    with pytest.raises(AssertionError, match="containerport"):
        k8s_validate(dep)


def raycluster_errors(rc: dict) -> list[str]:
    """Errors of a RayCluster against KubeRay's CRD schema, its pod templates validated as PodTemplates."""
    schema = json.loads((INFRA / "schemas" / "raycluster.schema.json").read_text())
    errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in jsonschema.Draft7Validator(schema).iter_errors(rc)]
    spec = rc["spec"]
    templates = [("head", spec["headGroupSpec"]["template"])]
    templates += [(g.get("groupName", "?"), g["template"]) for g in spec.get("workerGroupSpecs", [])]
    for name, template in templates:
        try:
            pod = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": template}
            k8s_validate(pod)
        except AssertionError as e:
            errors.append(str(e))
    return errors


def test_raycluster_matches_the_crd(bundle):
    """Bugs: a KubeRay field misspelt or misplaced (silently pruned by the API server, so the autoscaler or the
    worker group would just not be there), a rayStartParams value that is not a string, an invalid pod template."""
    assert raycluster_errors(checks.raycluster(bundle)) == []


@pytest.mark.parametrize(
    "drift",
    [
        lambda s: s["workerGroupSpecs"][0].update(minReplica=s["workerGroupSpecs"][0].pop("minReplicas")),
        lambda s: s["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
        lambda s: s["workerGroupSpecs"][0]["template"]["spec"]["containers"][0].update(gpus=8),
        lambda s: s.update(enableInTreeAutoScaling=s.pop("enableInTreeAutoscaling")),
    ],
    ids=["minReplica", "int-rayStartParam", "container-field", "autoscaling-case"],
)
def test_raycluster_schema_catches_drift(bundle, drift):
    """The CRD check can fail: each planted mistake is reported."""
    rc = copy.deepcopy(checks.raycluster(bundle))
    drift(rc["spec"])
    assert raycluster_errors(rc)


def render_pool_job(pool: dict) -> dict:
    """The Job a Kubernetes worker would create from the pool template with its defaults (as prefect-kubernetes
    renders it: placeholders filled, `env` turned into a list)."""
    from prefect.utilities.templating import apply_values

    values = {k: v["default"] for k, v in pool["variables"]["properties"].items() if "default" in v}
    values.update(name="train-ldm-run", command="prefect flow-run execute", env={"PREFECT__FLOW_RUN_ID": "x"})
    cfg = apply_values(pool["job_configuration"], values)
    job = cfg["job_manifest"]
    container = job["spec"]["template"]["spec"]["containers"][0]
    container["env"] = [{"name": k, "value": v} for k, v in container["env"].items()]
    container["args"] = container["args"].split()
    # prefect-kubernetes requires these two in the pod spec (its validator compares the manifest with its base
    # Job, which has them there); the API server prunes them with a warning. Dropped here as the server does.
    for quirk in ("parallelism", "completions"):
        assert job["spec"]["template"]["spec"].pop(quirk) == 1
    return job


def test_pool_template_renders_a_valid_job(bundle):
    """Bugs: a template whose rendered Job Kubernetes would refuse (a resources quantity left as a placeholder,
    a volume without its claim), a job sent to another namespace than the ConfigMap's, or without the Secret."""
    job = render_pool_job(bundle.pool)
    k8s_validate(job)
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert job["metadata"]["namespace"] == "ldm"
    assert container["image"].startswith(checks.IMAGE + ":")
    assert {"configMapRef": {"name": "ldm-endpoints"}} in container["envFrom"]
    assert {"secretRef": {"name": "ldm-s3"}} in container["envFrom"]


def _set_pool_image(b: Bundle) -> None:
    b.pool["variables"]["properties"]["image"]["default"] = "ghcr.io/ldm-pipeline/ldm-pipeline:0.0.9"


def _rename_raycluster(b: Bundle) -> None:
    checks.raycluster(b)["metadata"]["name"] = "ldm-gpu"


def _move_mlflow_port(b: Bundle) -> None:
    svc = checks.one(b, "Service", "mlflow")
    svc["spec"]["ports"][0]["port"] = 80


def _drop_secret_key(b: Bundle) -> None:
    checks.one(b, "Secret", "mlflow-postgres")["stringData"].pop("POSTGRES_DB")


def _rename_s3_key(b: Bundle) -> None:
    keys = checks.one(b, "Secret", "ldm-s3")["stringData"]
    keys["aws_access_key_id"] = keys.pop("AWS_ACCESS_KEY_ID")


def _swap_placeholders(b: Bundle) -> None:
    checks.one(b, "Secret", "ldm-s3")["stringData"]["AWS_SECRET_ACCESS_KEY"] = "${AWS_ACCESS_KEY_ID}"


def _paste_a_key(b: Bundle) -> None:
    checks.one(b, "Secret", "ldm-s3")["stringData"]["AWS_SECRET_ACCESS_KEY"] = "wJalrXUtnFEMI/K7MDENG"


def _grow_object_store(b: Bundle) -> None:
    checks.raycluster(b)["spec"]["workerGroupSpecs"][0]["rayStartParams"]["object-store-memory"] = str(200 * 2**30)


def _other_namespace(b: Bundle) -> None:
    checks.one(b, "Deployment", "mlflow")["metadata"]["namespace"] = "mlflow"


def _expose_dashboard(b: Bundle) -> None:
    checks.raycluster(b)["spec"]["headGroupSpec"]["serviceType"] = "LoadBalancer"


def _more_workers(b: Bundle) -> None:
    b.prod["compute"]["num_workers"] = 64


def _unused_variable(b: Bundle) -> None:
    b.pool["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]["resources"] = {}


def _bump_ray(b: Bundle) -> None:
    checks.raycluster(b)["spec"]["rayVersion"] = "2.61.0"


def _bump_torch(b: Bundle) -> None:
    b.dockerfile = b.dockerfile.replace("torch==2.14.1", "torch==2.13.0")


def _prod_tracking_elsewhere(b: Bundle) -> None:
    b.prod["tracking"]["uri"] = "http://mlflow.mlflow.svc:5000"


def _drop_allowed_host(b: Bundle) -> None:
    c = checks.one(b, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
    c["args"] = [a if not a.startswith("--allowed-hosts") else "--allowed-hosts=localhost:5000" for a in c["args"]]


def _run_as_root(b: Bundle) -> None:
    b.dockerfile += "\nUSER root\n"


DRIFTS = [
    (checks.check_image, _set_pool_image),
    (checks.check_ray_endpoints, _rename_raycluster),
    (checks.check_mlflow_endpoints, _move_mlflow_port),
    (checks.check_mlflow_endpoints, _prod_tracking_elsewhere),
    (checks.check_mlflow_endpoints, _drop_allowed_host),
    (checks.check_references, _drop_secret_key),
    (checks.check_references, _rename_s3_key),
    (checks.check_no_credentials, _paste_a_key),
    (checks.check_no_credentials, _swap_placeholders),
    (checks.check_no_credentials, _run_as_root),
    (checks.check_ray_sizes, _grow_object_store),
    (checks.check_ray_sizes, _more_workers),
    (checks.check_namespace, _other_namespace),
    (checks.check_cluster_internal, _expose_dashboard),
    (checks.check_pool_variables, _unused_variable),
    (checks.check_versions, _bump_ray),
    (checks.check_versions, _bump_torch),
]


@pytest.mark.parametrize("check", checks.CHECKS, ids=lambda c: c.__name__)
def test_infra_agrees(bundle, check):
    """The real files pass every consistency check (each check's docstring names what it compares)."""
    check(bundle)


@pytest.mark.parametrize("check,drift", DRIFTS, ids=lambda x: x.__name__)
def test_check_catches_drift(bundle, check, drift):
    """Each check fails on a plausible drift: the image tag of one place, the RayCluster renamed without the
    ConfigMap, the MLflow port moved, a Secret key dropped or renamed, a key pasted into a template or
    two placeholders swapped, an object store larger
    than /dev/shm, more training workers than GPUs, another namespace, a public dashboard, a pool variable left
    unused, Ray or torch moved in one place only, the server refusing its own service name, a root image."""
    b = copy.deepcopy(bundle)
    b.files = {id(d): bundle.files[id(o)] for d, o in zip(b.docs, bundle.docs, strict=True)}
    drift(b)
    with pytest.raises(AssertionError):
        check(b)


def test_every_check_has_a_drift():
    """A new check without a planted drift could be one that never fails."""
    assert {c for c, _ in DRIFTS} == set(checks.CHECKS)
