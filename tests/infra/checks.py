"""Consistency checks over infra/: each takes the loaded bundle and fails with an AssertionError naming the drift.

They are functions of a bundle (not of the files) so that test_manifests.py can run each on the real files and
on a copy with one plausible drift planted, proving every check can fail.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
IMAGE = "ghcr.io/ldm-pipeline/ldm-pipeline"  # the one image name the issue fixes
PLACEHOLDER = re.compile(r"^\$\{[A-Z][A-Z0-9_]*\}$")
CREDENTIAL_NAME = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|API_KEY", re.I)
GIB = 2**30
UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": GIB, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


@dataclass
class Bundle:
    """Every manifest of infra/k8s, the pool template, the Dockerfile text, pyproject and conf/prod.yaml."""

    docs: list[dict]
    pool: dict
    dockerfile: str
    pyproject: dict
    prod: dict
    files: dict[int, str] = field(default_factory=dict)  # id(doc) -> file name, for messages


def load() -> Bundle:
    """Read infra/ and the files it must agree with."""
    docs, files = [], {}
    for path in sorted((INFRA / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append(doc)
                files[id(doc)] = path.name
    return Bundle(
        docs=docs,
        pool=json.loads((INFRA / "k8s" / "prefect-work-pool.json").read_text()),
        dockerfile=(INFRA / "Dockerfile").read_text(),
        pyproject=tomllib.loads((ROOT / "pyproject.toml").read_text()),
        prod=yaml.safe_load((ROOT / "conf" / "prod.yaml").read_text()),
        files=files,
    )


def quantity(q: str | int) -> float:
    """A Kubernetes quantity ("120Gi", "500m", "8") as a number."""
    s = str(q)
    if s.endswith("m"):
        return float(s[:-1]) / 1000
    for unit in sorted(UNITS, key=len, reverse=True):
        if s.endswith(unit):
            return float(s[: -len(unit)]) * UNITS[unit]
    return float(s)


def of_kind(b: Bundle, kind: str) -> list[dict]:
    """The documents of one kind."""
    return [d for d in b.docs if d.get("kind") == kind]


def one(b: Bundle, kind: str, name: str) -> dict:
    """The one document of that kind and name."""
    found = [d for d in of_kind(b, kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def raycluster(b: Bundle) -> dict:
    """The RayCluster."""
    (rc,) = of_kind(b, "RayCluster")
    return rc


def pod_specs(b: Bundle) -> list[tuple[str, dict]]:
    """(where, pod spec) of every pod the manifests and the pool template make."""
    out = []
    for d in b.docs:
        kind, name = d["kind"], d["metadata"]["name"]
        if kind in ("Deployment", "StatefulSet", "Job"):
            out.append((f"{kind} {name}", d["spec"]["template"]["spec"]))
        if kind == "RayCluster":
            out.append((f"RayCluster {name} head", d["spec"]["headGroupSpec"]["template"]["spec"]))
            for g in d["spec"].get("workerGroupSpecs", []):
                out.append((f"RayCluster {name} {g['groupName']}", g["template"]["spec"]))
    job = b.pool["job_configuration"]["job_manifest"]
    out.append(("work pool job", job["spec"]["template"]["spec"]))
    return out


def containers(b: Bundle) -> list[tuple[str, dict]]:
    """(where, container) of every container."""
    return [(f"{where}/{c['name']}", c) for where, spec in pod_specs(b) for c in spec["containers"]]


def listed(c: dict, key: str) -> list:
    """A container's env / args list; the pool template's `{{ env }}` placeholders count as empty."""
    value = c.get(key, [])
    return value if isinstance(value, list) else []


def pool_default(b: Bundle, var: str) -> Any:
    """The default of one work-pool variable."""
    return b.pool["variables"]["properties"][var].get("default")


def endpoints(b: Bundle) -> dict[str, str]:
    """The ldm-endpoints ConfigMap's data."""
    return one(b, "ConfigMap", "ldm-endpoints")["data"]


# --- the checks ------------------------------------------------------------------------------------------


def check_image(b: Bundle) -> None:
    """One image, one tag: the Dockerfile's name, every pod's image, the pool's default, tag = project version."""
    named = re.search(r"^#\s*image:\s*(\S+)\s*$", b.dockerfile, re.M)
    assert named and named.group(1) == IMAGE, f"infra/Dockerfile names image {named and named.group(1)}, not {IMAGE}"
    version = b.pyproject["project"]["version"]
    ours = [(w, c["image"]) for w, c in containers(b) if not c["image"].startswith(("postgres:", "{{"))]
    ours.append(("work pool default", pool_default(b, "image")))
    for where, image in ours:
        assert image == f"{IMAGE}:{version}", f"{where} runs {image}, expected {IMAGE}:{version} (pyproject version)"


def check_versions(b: Bundle) -> None:
    """The Dockerfile's torch and the RayCluster's rayVersion are the versions pyproject.toml pins."""
    deps = b.pyproject["project"]["dependencies"]
    torch = next(d for d in deps if d.startswith("torch=="))
    assert torch in b.dockerfile, f"infra/Dockerfile does not install {torch} (pyproject.toml's pin)"
    ray_pin = next(d for d in deps if d.startswith("ray["))
    lo, hi = re.search(r">=([\d.]+),<([\d.]+)", ray_pin).groups()
    ray_version = tuple(int(x) for x in raycluster(b)["spec"]["rayVersion"].split("."))
    low, high = tuple(int(x) for x in lo.split(".")), tuple(int(x) for x in hi.split("."))
    assert low <= ray_version < high, f"RayCluster rayVersion {ray_version} is outside pyproject's {ray_pin}"


def check_namespace(b: Bundle) -> None:
    """Every object, the pool's jobs and every in-cluster host name use the one namespace."""
    (ns,) = [d["metadata"]["name"] for d in of_kind(b, "Namespace")]
    for d in b.docs:
        if d["kind"] != "Namespace":
            got = d["metadata"].get("namespace")
            assert got == ns, f"{b.files.get(id(d))}: {d['kind']} {d['metadata']['name']} in namespace {got}, not {ns}"
    assert pool_default(b, "namespace") == ns, f"work pool jobs go to {pool_default(b, 'namespace')}, not {ns}"
    texts = list(endpoints(b).values()) + [str(e.get("value", "")) for _, c in containers(b) for e in listed(c, "env")]
    texts += [a for _, c in containers(b) for a in listed(c, "args")]
    for host in re.findall(r"([a-z0-9-]+)\.([a-z0-9-]+)\.svc", " ".join(texts)):
        assert host[1] == ns, f"host {host[0]}.{host[1]}.svc is in namespace {host[1]}, not {ns}"


def _service_port(b: Bundle, name: str, port: int) -> dict:
    svc = one(b, "Service", name)
    assert svc["spec"].get("type", "ClusterIP") == "ClusterIP", f"Service {name} is {svc['spec']['type']}"
    ports = [p for p in svc["spec"]["ports"] if p["port"] == port]
    assert ports, f"Service {name} has no port {port}"
    return ports[0]


def _host(url: str, ns: str) -> tuple[str, int]:
    parts = urlsplit(url)
    suffix = f".{ns}.svc.cluster.local"
    assert parts.hostname.endswith(suffix), f"{url} is not a service of namespace {ns} ({suffix})"
    return parts.hostname.removesuffix(suffix), parts.port


def check_ray_endpoints(b: Bundle) -> None:
    """RAY_ADDRESS and RAY_DASHBOARD_URL name the head service KubeRay makes and the head's client / dashboard ports."""
    rc, ep = raycluster(b), endpoints(b)
    ns = rc["metadata"]["namespace"]
    head = rc["spec"]["headGroupSpec"]
    service = (head.get("headService") or {}).get("metadata", {}).get("name") or f"{rc['metadata']['name']}-head-svc"
    ports = {p["name"]: p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    for var, scheme, port_name in (("RAY_ADDRESS", "ray", "client"), ("RAY_DASHBOARD_URL", "http", "dashboard")):
        assert urlsplit(ep[var]).scheme == scheme, f"{var}={ep[var]} should be a {scheme}:// URL"
        host, port = _host(ep[var], ns)
        assert host == service, f"{var} names {host}, but the RayCluster's head service is {service}"
        assert port == ports.get(port_name), f"{var} uses port {port}, the head's {port_name} port is {ports}"
    dash = head["rayStartParams"].get("dashboard-port", "8265")
    assert str(ports["dashboard"]) == dash, f"head container port dashboard {ports['dashboard']} != Ray's {dash}"


def _mlflow_container(b: Bundle) -> dict:
    return one(b, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]


def check_mlflow_endpoints(b: Bundle) -> None:
    """MLFLOW_TRACKING_URI = the mlflow Service and port the server listens on, is an allowed host, and is prod's
    tracking.uri; the backend store URI names the Postgres service and port."""
    ep, c = endpoints(b), _mlflow_container(b)
    ns = one(b, "Namespace", "ldm")["metadata"]["name"]
    uri = ep["MLFLOW_TRACKING_URI"]
    host, port = _host(uri, ns)
    svc_port = _service_port(b, host, port)
    args = dict(a.removeprefix("--").split("=", 1) for a in c["args"] if "=" in a)
    target = {p["name"]: p["containerPort"] for p in c["ports"]}.get(svc_port["targetPort"], svc_port["targetPort"])
    assert str(target) == args["port"], f"Service {host}:{port} targets {target}, the server listens on {args['port']}"
    allowed = args["allowed-hosts"].split(",")
    netloc = urlsplit(uri).netloc
    assert netloc in allowed, f"mlflow --allowed-hosts lacks {netloc}: MLflow would refuse {uri} (HTTP 403)"
    assert b.prod["tracking"]["uri"] == uri, f"conf/prod.yaml tracking.uri {b.prod['tracking']['uri']} != {uri}"
    env = {e["name"]: e for e in c["env"]}
    backend = env["MLFLOW_BACKEND_STORE_URI"]["value"]
    pg_host, pg_port = _host(backend, ns)
    _service_port(b, pg_host, pg_port)
    assert all(f"$({v})" in backend for v in ("POSTGRES_USER", "POSTGRES_PASSWORD")), "backend URI not from Secret"
    assert "--serve-artifacts" in c["args"] and args["artifacts-destination"].startswith("s3://"), "artifacts not S3"


def _secret_keys(b: Bundle) -> dict[str, set[str]]:
    return {d["metadata"]["name"]: set(d.get("stringData", {})) | set(d.get("data", {})) for d in of_kind(b, "Secret")}


def check_references(b: Bundle) -> None:
    """Every Secret / ConfigMap / key / PVC / $(VAR) a pod refers to exists."""
    secrets = _secret_keys(b)
    maps = {d["metadata"]["name"]: set(d["data"]) for d in of_kind(b, "ConfigMap")}
    claims = {d["metadata"]["name"] for d in of_kind(b, "PersistentVolumeClaim")}
    # s3fs / boto read exactly these names from the environment the envFrom of ldm-s3 makes
    missing = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} - secrets.get("ldm-s3", set())
    assert not missing, f"Secret ldm-s3 lacks {sorted(missing)}: S3 clients would find no credentials"
    for where, c in containers(b):
        for src in c.get("envFrom", []):
            if "secretRef" in src:
                assert src["secretRef"]["name"] in secrets, f"{where}: envFrom Secret {src['secretRef']['name']}"
            if "configMapRef" in src:
                assert src["configMapRef"]["name"] in maps, f"{where}: envFrom ConfigMap {src['configMapRef']['name']}"
        defined: set[str] = set()
        for e in listed(c, "env"):
            ref = e.get("valueFrom", {})
            for kind, known in (("secretKeyRef", secrets), ("configMapKeyRef", maps)):
                if kind in ref:
                    name, key = ref[kind]["name"], ref[kind]["key"]
                    assert key in known.get(name, ()), f"{where}: {e['name']} reads {kind} {name}/{key}: no such key"
            for var in re.findall(r"\$\(([A-Z_][A-Z0-9_]*)\)", str(e.get("value", ""))):
                assert var in defined, f"{where}: {e['name']} uses $({var}), not defined before it"
            defined.add(e["name"])
    for where, spec in pod_specs(b):
        for v in spec.get("volumes", []):
            if "persistentVolumeClaim" in v:
                claim = v["persistentVolumeClaim"]["claimName"]
                assert claim in claims, f"{where}: volume {v['name']} claims PVC {claim}, which no manifest defines"


def check_no_credentials(b: Bundle) -> None:
    """Secrets are templates (${PLACEHOLDER} values), the ConfigMap and the Dockerfile carry no credential."""
    for d in of_kind(b, "Secret"):
        for key, value in {**d.get("stringData", {}), **d.get("data", {})}.items():
            where = f"Secret {d['metadata']['name']}/{key}"
            assert PLACEHOLDER.match(str(value)), f"{where} holds a value, not a ${{PLACEHOLDER}}"
            assert value == f"${{{key}}}", f"{where} is filled from {value}, not ${{{key}}}"
    for key in endpoints(b):
        assert not CREDENTIAL_NAME.search(key), f"ConfigMap ldm-endpoints holds {key}: credentials go in a Secret"
    for line in b.dockerfile.splitlines():
        if re.match(r"\s*(ENV|ARG)\b", line):
            assert not CREDENTIAL_NAME.search(line), f"infra/Dockerfile bakes a credential in: {line.strip()}"
    users = re.findall(r"^USER\s+(\S+)", b.dockerfile, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0"), f"infra/Dockerfile runs as {users[-1:]}: not root"


def check_cluster_internal(b: Bundle) -> None:
    """Nothing is exposed outside the cluster: no LoadBalancer / NodePort Service, no head ingress."""
    for d in of_kind(b, "Service"):
        kind = d["spec"].get("type", "ClusterIP")
        assert kind == "ClusterIP", f"Service {d['metadata']['name']} is {kind}"
    head = raycluster(b)["spec"]["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", f"Ray head service is {head['serviceType']}"
    assert not head.get("enableIngress"), "the Ray head has an Ingress: the dashboard would be public"


def check_ray_sizes(b: Bundle) -> None:
    """Each Ray group's /dev/shm holds its object store and fits in its memory limit; the GPU workers can host
    conf/prod.yaml's compute.num_workers."""
    spec = raycluster(b)["spec"]
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    for name, g in groups:
        pod = g["template"]["spec"]
        shm = [v for v in pod["volumes"] if v["name"] == "dshm"]
        assert shm and shm[0]["emptyDir"].get("medium") == "Memory", f"{name}: no memory-backed dshm volume"
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        assert mounts.get("/dev/shm") == "dshm", f"{name}: dshm is not mounted at /dev/shm"
        store = int(g["rayStartParams"]["object-store-memory"])
        size = quantity(shm[0]["emptyDir"]["sizeLimit"])
        limit = quantity(pod["containers"][0]["resources"]["limits"]["memory"])
        assert store <= size, f"{name}: object store {store / GIB:.0f} GiB > /dev/shm {size / GIB:.0f} GiB"
        assert size < limit, f"{name}: /dev/shm {size / GIB:.0f} GiB must leave room in the {limit / GIB:.0f} GiB limit"
    assert spec.get("enableInTreeAutoscaling") is True, "the RayCluster does not autoscale"
    gpus = 0
    for g in spec["workerGroupSpecs"]:
        res = g["template"]["spec"]["containers"][0]["resources"]
        per = int(res["limits"].get("nvidia.com/gpu", 0))
        assert g["minReplicas"] <= g["maxReplicas"], f"{g['groupName']}: minReplicas > maxReplicas"
        gpus += per * g["maxReplicas"]
    want = b.prod["compute"]["num_workers"]
    assert b.prod["compute"]["use_gpu"] and gpus >= want, f"the GPU groups reach {gpus} GPUs, prod trains on {want}"


def check_pool_variables(b: Bundle) -> None:
    """Every {{ placeholder }} of the pool's job configuration is a declared variable, and every variable is used."""
    text = json.dumps(b.pool["job_configuration"])
    used = set(re.findall(r"\{\{\s*([a-z_]+)\s*\}\}", text))
    declared = set(b.pool["variables"]["properties"])
    assert used <= declared, f"work pool placeholders without a variable: {sorted(used - declared)}"
    assert declared <= used, f"work pool variables never used in job_configuration: {sorted(declared - used)}"


CHECKS = [
    check_image,
    check_versions,
    check_namespace,
    check_ray_endpoints,
    check_mlflow_endpoints,
    check_references,
    check_no_credentials,
    check_cluster_internal,
    check_ray_sizes,
    check_pool_variables,
]
