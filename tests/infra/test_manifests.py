"""infra/ validated offline: built-in kinds against Kubernetes' schemas (kubernetes-validate ships them), the
RayCluster, PodMonitors and Prometheus against their CRDs' schemas, the Prefect pool template rendered to a Job,
and the names, ports, images and environment variables that refer to each other checked to agree
(tests/infra/checks.py and the modules it lists).

Each consistency check also runs on a copy of the files with one plausible drift planted (drifts.py), so a check
that could never fail would fail here; test_original.py runs them on the files as issue 26 found them.
"""

from __future__ import annotations

import copy
import json

import jsonschema
import kubernetes_validate
import pytest

from tests.infra import bundle as bundles
from tests.infra import checks
from tests.infra.checks import INFRA, Bundle
from tests.infra.drifts import DRIFTS, copy_of

K8S_VERSION = "1.31.0"  # the oldest minor still in the big clouds' standard support (EKS, GKE, AKS)
CRD_KINDS = {"RayCluster", "PodMonitor", "Prometheus"}


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
    assert {"Namespace", "ConfigMap", "Secret", "Service", "Deployment", "StatefulSet", "Role", "RoleBinding"} <= kinds


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


def crd_errors(doc: dict) -> list[str]:
    """Errors of a PodMonitor or Prometheus against the Prometheus Operator's CRD schema (infra/schemas)."""
    schema = json.loads((INFRA / "schemas" / f"{doc['kind'].lower()}.schema.json").read_text())
    return [f"{'/'.join(map(str, e.path))}: {e.message}" for e in jsonschema.Draft7Validator(schema).iter_errors(doc)]


def test_monitoring_kinds_match_their_crds(bundle):
    """Bugs: a PodMonitor or Prometheus field misspelt or misplaced (`podMetricEndpoints`, `podMonitorSelecter`),
    which the API server would prune, leaving Prometheus scraping nothing."""
    docs = [d for d in bundle.docs if d["kind"] in ("PodMonitor", "Prometheus")]
    assert {d["kind"] for d in docs} == {"PodMonitor", "Prometheus"}
    assert {d["metadata"]["name"]: crd_errors(d) for d in docs} == {d["metadata"]["name"]: [] for d in docs}


@pytest.mark.parametrize(
    "kind,drift",
    [
        ("PodMonitor", lambda s: s.update(podMetricEndpoints=s.pop("podMetricsEndpoints"))),
        ("PodMonitor", lambda s: s["podMetricsEndpoints"][0].update(port=8080)),
        ("Prometheus", lambda s: s.update(podMonitorSelecter=s.pop("podMonitorSelector"))),
        ("Prometheus", lambda s: s.update(replicas="1")),
    ],
    ids=["endpoints-name", "port-as-number", "selector-name", "replicas-string"],
)
def test_monitoring_schemas_catch_drift(bundle, kind, drift):
    """The CRD check can fail: each planted mistake is reported."""
    doc = copy.deepcopy(checks.of_kind(bundle, kind)[0])
    drift(doc["spec"])
    assert crd_errors(doc)


def render_pool_job(pool: dict, variables: dict | None = None) -> dict:
    """The Job a Kubernetes worker would create (tests/infra/bundle.py renders it as prefect-kubernetes does)."""
    return bundles.render_pool_job(pool, variables)


def test_pool_template_renders_a_valid_job(bundle):
    """Bugs: a template whose rendered Job Kubernetes would refuse (a resources quantity left as a placeholder,
    a volume without its claim), a job sent to another namespace than the ConfigMap's, or without the Secrets;
    the same with train-ldm/prod's job variables from prefect.yaml filled in."""
    for variables in ({}, bundles.job_variables(bundle)):
        job = render_pool_job(bundle.pool, variables)
        k8s_validate(job)
        container = job["spec"]["template"]["spec"]["containers"][0]
        assert job["metadata"]["namespace"] == "ldm"
        assert container["image"].startswith(checks.image_name(bundle) + ":")
        assert {"configMapRef": {"name": "ldm-endpoints"}} in container["envFrom"]
        assert {"secretRef": {"name": "ldm-s3"}} in container["envFrom"]


@pytest.mark.parametrize("check", checks.CHECKS, ids=lambda c: c.__name__)
def test_infra_agrees(bundle, check):
    """The real files pass every consistency check (each check's docstring names what it compares)."""
    check(bundle)


@pytest.mark.parametrize("check,drift", DRIFTS, ids=lambda x: x.__name__)
def test_check_catches_drift(bundle, check, drift):
    """Each check fails on a plausible drift (drifts.py names the bug each one is)."""
    b = copy_of(bundle)
    drift(b)
    with pytest.raises(AssertionError):
        check(b)


def test_every_check_has_a_drift():
    """A new check without a planted drift could be one that never fails."""
    assert {c for c, _ in DRIFTS} == set(checks.CHECKS)
