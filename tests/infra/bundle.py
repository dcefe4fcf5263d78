"""infra/ and every file it must agree with, read into one Bundle that the checks take.

A bundle reads the working tree, or any commit of the repository (`load(commit)`), so a test can show that a
check fails on the files as they were, not only on a copy with a drift planted by hand. Beside the manifests it
holds the raw text of every file whose names are checked (comments and examples included) and the Python
sources whose environment reads are compared with what infra sets.
"""

from __future__ import annotations

import json
import re
import subprocess
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
CODE = ("flows", "ldm", "data_prep")  # the packages whose environment reads are checked
TEXT_SUFFIXES = (".yaml", ".yml", ".json", ".md", "Dockerfile", ".dockerignore")
KUBERAY_METRICS_PORT = 8080  # KubeRay's DefaultMetricsPort: the metrics-export-port it gives Ray by default


@dataclass
class Bundle:
    """The manifests of infra/k8s, the pool template, prefect.yaml, conf/prod.yaml, pyproject, the Dockerfile and
    infra/README as parsed objects, plus `texts` (path -> raw text of every checked file) and `sources` (path ->
    Python source under flows/, ldm/, data_prep/)."""

    docs: list[dict]
    pool: dict
    dockerfile: str
    pyproject: dict
    prod: dict
    prefect: dict = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    files: dict[int, str] = field(default_factory=dict)  # id(doc) -> file name, for messages

    @property
    def readme(self) -> str:
        """infra/README.md."""
        return self.texts.get("infra/README.md", "")


class Reader:
    """Files of the working tree, or of one commit (read through one `git cat-file --batch`)."""

    def __init__(self, commit: str | None = None):
        self.commit = commit

    def list(self, *folders: str) -> list[str]:
        """Paths of the files under these folders (relative to the repository root)."""
        if self.commit is None:
            return sorted(str(p.relative_to(ROOT)) for f in folders for p in (ROOT / f).rglob("*") if p.is_file())
        out = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "-r", "--name-only", self.commit, "--", *folders],
                             capture_output=True, text=True, check=True)  # fmt: skip
        return sorted(out.stdout.split())

    def read(self, paths: list[str]) -> dict[str, str]:
        """path -> text."""
        if self.commit is None:
            return {p: (ROOT / p).read_text() for p in paths}
        query = "".join(f"{self.commit}:{p}\n" for p in paths).encode()
        raw = subprocess.run(["git", "-C", str(ROOT), "cat-file", "--batch"], input=query, capture_output=True,
                             check=True).stdout  # fmt: skip
        out, at = {}, 0
        for p in paths:
            header_end = raw.index(b"\n", at)
            size = int(raw[at:header_end].split()[2])
            out[p] = raw[header_end + 1 : header_end + 1 + size].decode()
            at = header_end + 1 + size + 1
        return out


def load(commit: str | None = None) -> Bundle:
    """Read infra/ and the files it must agree with, from the working tree or from `commit`."""
    reader = Reader(commit)
    infra = [p for p in reader.list("infra") if p.endswith(TEXT_SUFFIXES) and "/schemas/" not in p]
    top = ["prefect.yaml", "conf/prod.yaml", "pyproject.toml"]
    sources = [p for p in reader.list(*CODE) if p.endswith(".py")]
    texts = reader.read(infra + top)
    docs, files = [], {}
    for path in sorted(p for p in infra if p.startswith("infra/k8s/") and p.endswith(".yaml")):
        for doc in yaml.safe_load_all(texts[path]):
            if doc:
                docs.append(doc)
                files[id(doc)] = Path(path).name
    return Bundle(
        docs=docs,
        pool=json.loads(texts["infra/k8s/prefect-work-pool.json"]),
        dockerfile=texts["infra/Dockerfile"],
        pyproject=tomllib.loads(texts.pop("pyproject.toml")),
        prod=yaml.safe_load(texts["conf/prod.yaml"]),
        prefect=yaml.safe_load(texts["prefect.yaml"]),
        texts=texts,
        sources=reader.read(sources),
        files=files,
    )


# --- what the files say, read the way the tools that use them read it -----------------------------------


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


def image_name(b: Bundle) -> str:
    """The project's image, as infra/Dockerfile names it (`# image: NAME`)."""
    named = re.search(r"^#\s*image:\s*(\S+)\s*$", b.dockerfile, re.M)
    assert named, "infra/Dockerfile names no image (a `# image: NAME` line)"
    return named.group(1)


def version(b: Bundle) -> str:
    """The project's version (pyproject.toml): the tag of its image."""
    return b.pyproject["project"]["version"]


def dockerfile_lines(b: Bundle) -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", re.sub(r"^\s*#.*\n", "", b.dockerfile, flags=re.M))
    return [line.strip() for line in text.splitlines() if line.strip()]


def workdir(b: Bundle) -> str:
    """The image's working directory (its last WORKDIR)."""
    found = [line.split(None, 1)[1] for line in dockerfile_lines(b) if line.upper().startswith("WORKDIR ")]
    assert found, "infra/Dockerfile sets no WORKDIR"
    return found[-1]


def image_env(b: Bundle) -> dict[str, str]:
    """The environment the image's ENV instructions set."""
    env = {}
    for line in dockerfile_lines(b):
        if line.upper().startswith("ENV "):
            env.update(dict(t.split("=", 1) for t in line.split()[1:] if "=" in t))
    return env


def kuberay_pods(b: Bundle) -> list[dict]:
    """The pods KubeRay makes from the RayCluster: group, node type, labels (the template's and KubeRay's own,
    as its labelPod sets them) and pod spec."""
    rc = raycluster(b)
    name, spec = rc["metadata"]["name"], rc["spec"]
    groups = [("headgroup", "head", spec["headGroupSpec"])]
    groups += [(g["groupName"], "worker", g) for g in spec.get("workerGroupSpecs", [])]
    out = []
    for group, node_type, g in groups:
        labels = dict(g["template"].get("metadata", {}).get("labels", {}))
        labels.update({"ray.io/is-ray-node": "yes", "app.kubernetes.io/name": "kuberay",
                       "app.kubernetes.io/created-by": "kuberay-operator"})  # fmt: skip
        labels.update({"ray.io/cluster": name, "ray.io/node-type": node_type, "ray.io/group": group})
        out.append({"group": group, "type": node_type, "labels": labels, "spec": g["template"]["spec"]})
    return out


def head_service(b: Bundle) -> tuple[str, dict[str, int]]:
    """The head Service KubeRay makes: its name and its ports (the head's Ray container ports, plus `metrics`)."""
    rc = raycluster(b)
    head = rc["spec"]["headGroupSpec"]
    name = (head.get("headService") or {}).get("metadata", {}).get("name") or f"{rc['metadata']['name']}-head-svc"
    ports = {p.get("name") or f"{p['containerPort']}-port": p["containerPort"]
             for p in head["template"]["spec"]["containers"][0].get("ports", [])}  # fmt: skip
    ports.setdefault("metrics", KUBERAY_METRICS_PORT)
    return name, ports


def services(b: Bundle) -> dict[tuple[str, str], dict[str, int]]:
    """(name, namespace) -> {port name: port} of every Service the manifests define or KubeRay makes."""
    out = {(d["metadata"]["name"], d["metadata"].get("namespace")): {p.get("name", ""): p["port"]
           for p in d["spec"]["ports"]} for d in of_kind(b, "Service")}  # fmt: skip
    name, ports = head_service(b)
    out[(name, raycluster(b)["metadata"].get("namespace"))] = ports
    return out


def pod_specs(b: Bundle) -> list[tuple[str, dict]]:
    """(where, pod spec) of every pod the manifests and the pool template make."""
    out = []
    for d in b.docs:
        kind, name = d["kind"], d["metadata"]["name"]
        if kind in ("Deployment", "StatefulSet", "Job"):
            out.append((f"{kind} {name}", d["spec"]["template"]["spec"]))
    for pod in kuberay_pods(b):
        where = "head" if pod["type"] == "head" else pod["group"]
        out.append((f"RayCluster {raycluster(b)['metadata']['name']} {where}", pod["spec"]))
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


def deployments(b: Bundle) -> dict[str, dict]:
    """prefect.yaml's deployments by name."""
    return {d["name"]: d for d in b.prefect.get("deployments", [])}


def job_variables(b: Bundle, deployment: str = "prod") -> dict:
    """A deployment's job variables, as `prefect deploy` registers them (`{{ $VAR }}` left as written: what a
    deployer whose shell lacks VAR gets)."""
    return dict(deployments(b)[deployment]["work_pool"].get("job_variables") or {})


def render_pool_job(pool: dict, variables: dict | None = None) -> dict:
    """The Job a Kubernetes worker would create from the pool template with its defaults overridden by a
    deployment's job variables (as prefect-kubernetes renders it: placeholders filled, `env` made a list)."""
    from prefect.utilities.templating import apply_values

    values = {k: v["default"] for k, v in pool["variables"]["properties"].items() if "default" in v}
    values.update(name="train-ldm-run", command="prefect flow-run execute")
    values.update(variables or {})
    values["env"] = {"PREFECT__FLOW_RUN_ID": "x", **(values.get("env") or {})}
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


def flow_container(b: Bundle) -> dict:
    """The flow-run job's container for train-ldm/prod: the pool template with prefect.yaml's job variables."""
    return render_pool_job(b.pool, job_variables(b))["spec"]["template"]["spec"]["containers"][0]


def container_env(b: Bundle, c: dict, image_too: bool = True) -> dict[str, str]:
    """A container's environment as Kubernetes builds it: the image's ENV (for the project's image), then envFrom
    (ConfigMap data, Secret keys as their placeholders), then `env`, which wins over both."""
    env = image_env(b) if image_too and str(c.get("image", "")).startswith(image_name(b) + ":") else {}
    maps = {d["metadata"]["name"]: d.get("data", {}) for d in of_kind(b, "ConfigMap")}
    secrets = {d["metadata"]["name"]: d.get("stringData", {}) | d.get("data", {}) for d in of_kind(b, "Secret")}
    for src in c.get("envFrom", []):
        if "configMapRef" in src:
            env.update(maps.get(src["configMapRef"]["name"], {}))
        if "secretRef" in src:
            env.update(secrets.get(src["secretRef"]["name"], {}))
    for e in listed(c, "env"):
        env[e["name"]] = str(e.get("value", "<from " + ", ".join(e.get("valueFrom", {})) + ">"))
    return env
