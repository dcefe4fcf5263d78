"""Consistency checks over infra/: each takes a loaded Bundle and fails with an AssertionError naming the drift.

They are functions of a bundle (not of the files) so that the tests can run each on the real files, on a copy
with one plausible drift planted, and on the files of an earlier commit, proving every check can fail. This
module holds the checks of the manifests' own consistency; names.py, envvars.py and monitoring.py hold those
of the names, variables and monitors the files share. CHECKS lists them all.
"""

from __future__ import annotations

import json
import re
from urllib.parse import urlsplit

from tests.infra.bundle import (  # noqa: F401 - re-exported: the tests reach the helpers through this module
    INFRA,
    ROOT,
    Bundle,
    containers,
    endpoints,
    head_service,
    image_name,
    listed,
    load,
    of_kind,
    one,
    pod_specs,
    pool_default,
    raycluster,
    version,
)

PLACEHOLDER = re.compile(r"^\$\{([A-Z][A-Z0-9_]*)\}$")
CREDENTIAL_NAME = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|API_KEY", re.I)
GIB = 2**30
UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": GIB, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
THIRD_PARTY_TAG = re.compile(r"^[a-z0-9./-]+:(?!latest$)[A-Za-z0-9][A-Za-z0-9._-]*$")  # pinned, not :latest


def quantity(q: str | int) -> float:
    """A Kubernetes quantity ("120Gi", "500m", "8") as a number."""
    s = str(q)
    if s.endswith("m"):
        return float(s[:-1]) / 1000
    for unit in sorted(UNITS, key=len, reverse=True):
        if s.endswith(unit):
            return float(s[: -len(unit)]) * UNITS[unit]
    return float(s)


# --- the checks ------------------------------------------------------------------------------------------


def check_image(b: Bundle) -> None:
    """One image, one tag: every pod that runs the project's image (infra/Dockerfile's `# image:` name), the pool's
    default and the prod deployment's image carry the project version (pyproject.toml), so the flow pod and the
    Ray pods run the same code; any other image is pinned to a tag, never :latest."""
    ours, tag = image_name(b), version(b)
    found = [(w, c["image"]) for w, c in containers(b) if not c["image"].startswith("{{")]
    found.append(("work pool default", pool_default(b, "image")))
    prod = next((d for d in b.prefect.get("deployments", []) if d["name"] == "prod"), {})
    found.append(("prefect.yaml prod", (prod.get("work_pool", {}).get("job_variables") or {}).get("image")))
    problems = []
    for where, image in (f for f in found if f[1]):
        repo = image.rsplit(":", 1)[0] if ":" in image.rsplit("/", 1)[-1] else image
        if repo == ours and image != f"{ours}:{tag}":
            problems.append(f"{where} runs {image}, expected {ours}:{tag} (pyproject version)")
        elif repo != ours and repo.startswith(ours.rsplit("/", 1)[0] + "/"):
            problems.append(f"{where} runs {image}: not the project's image {ours}")
        elif repo != ours and not THIRD_PARTY_TAG.match(image):
            problems.append(f"{where} runs {image}: pin a tag (a moving tag runs whatever was pushed last)")
    assert not problems, "\n".join(problems)


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
    assert parts.hostname and parts.hostname.endswith(suffix), f"{url} is not a service of namespace {ns} ({suffix})"
    return parts.hostname.removesuffix(suffix), parts.port


def check_ray_endpoints(b: Bundle) -> None:
    """RAY_ADDRESS (the ConfigMap's) and conf/prod.yaml's compute.ray_address both name the job API the flow
    submits the Ray stages to: http:// on the RayCluster's head service, at the head's dashboard port (a ray://
    client address would leave the code to guess the dashboard's port; `auto` would run them in the flow pod)."""
    rc = raycluster(b)
    ns, head = rc["metadata"]["namespace"], rc["spec"]["headGroupSpec"]
    service, ports = head_service(b)
    problems = []
    named = (("ConfigMap ldm-endpoints RAY_ADDRESS", endpoints(b).get("RAY_ADDRESS")),
             ("conf/prod.yaml compute.ray_address", b.prod.get("compute", {}).get("ray_address")))  # fmt: skip
    for where, url in named:
        parts = urlsplit(str(url))
        host = (parts.hostname or "").removesuffix(f".{ns}.svc.cluster.local")
        if parts.scheme != "http" or host != service or parts.port != ports.get("dashboard"):
            problems.append(f"{where} is {url!r}: the head's job API is "
                            f"http://{service}.{ns}.svc.cluster.local:{ports.get('dashboard')}")  # fmt: skip
    dash = head["rayStartParams"].get("dashboard-port", "8265")
    if str(ports.get("dashboard")) != dash:
        problems.append(f"head container port dashboard {ports.get('dashboard')} != Ray's dashboard-port {dash}")
    assert not problems, "\n".join(problems)


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


def _made_by_readme(b: Bundle) -> set[str]:
    """Names of the objects infra/README.md's steps create by hand (`kubectl create configmap NAME ...`)."""
    return set(re.findall(r"create (?:configmap|secret \S+) ([a-z0-9-]+)", b.readme))


def check_references(b: Bundle) -> None:
    """Every Secret / ConfigMap / key / PVC / $(VAR) a pod refers to, by env or by volume, exists (an optional
    ConfigMap volume may instead be one that infra/README.md's steps create)."""
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
            sources = [s for s in [v] + v.get("projected", {}).get("sources", []) if "secret" in s or "configMap" in s]
            for src in sources:
                kind, ref = ("Secret", src["secret"]) if "secret" in src else ("ConfigMap", src["configMap"])
                name, known = ref.get("secretName") or ref.get("name"), secrets if kind == "Secret" else maps
                if name not in known:
                    made = ref.get("optional") and name in _made_by_readme(b)
                    assert made, f"{where}: volume {v['name']} mounts {kind} {name}, which no manifest defines"
                for item in ref.get("items", []):
                    assert item["key"] in known.get(name, ()), (
                        f"{where}: volume {v['name']} mounts {kind} {name}/{item['key']}: no such key"
                    )


def check_no_credentials(b: Bundle) -> None:
    """Secrets are templates: each value a ${PLACEHOLDER} named after its key (KubeRay's `auth_token` may be
    ${RAY_AUTH_TOKEN}), no placeholder used twice; the ConfigMap and the Dockerfile carry no credential."""
    seen: dict[str, str] = {}
    for d in of_kind(b, "Secret"):
        for key, value in {**d.get("stringData", {}), **d.get("data", {})}.items():
            where = f"Secret {d['metadata']['name']}/{key}"
            placeholder = PLACEHOLDER.match(str(value))
            assert placeholder, f"{where} holds a value, not a ${{PLACEHOLDER}}"
            var = placeholder.group(1)
            assert var.endswith(key.upper()), f"{where} is filled from {value}, not a ${{...{key.upper()}}}"
            assert var not in seen, f"{where} and {seen.get(var)} are both filled from {value}"
            seen[var] = where
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


def check_secret_exports(b: Bundle) -> None:
    """Every ${PLACEHOLDER} of secrets.template.yaml is exported by infra/README.md's steps before its envsubst
    (envsubst writes an unset one as an empty string: an empty password or Ray token, silently)."""
    exports = re.findall(r"^export (.+)$", b.readme, re.M)
    exported = {v for line in exports for v in re.findall(r"\b([A-Z_0-9]+)=", line)}
    values = [str(v) for d in of_kind(b, "Secret") for v in {**d.get("stringData", {}), **d.get("data", {})}.values()]
    needed = {m.group(1) for m in map(PLACEHOLDER.match, values) if m}
    assert needed <= exported, f"infra/README.md exports no {sorted(needed - exported)} for the Secret templates"


from tests.infra import envvars, monitoring, names  # noqa: E402 - they use the helpers above through bundle.py

CHECKS = [
    check_image,
    check_versions,
    check_namespace,
    check_ray_endpoints,
    check_mlflow_endpoints,
    check_references,
    check_no_credentials,
    check_secret_exports,
    check_cluster_internal,
    check_ray_sizes,
    check_pool_variables,
    names.check_image_refs,
    names.check_workdir,
    names.check_buckets,
    names.check_services,
    envvars.check_env_read,
    envvars.check_env_endpoints_set,
    envvars.check_deploy_env,
    envvars.check_env_paths,
    envvars.check_ray_auth,
    envvars.check_flow_endpoints,
    monitoring.check_pod_monitors,
    monitoring.check_grafana,
]
