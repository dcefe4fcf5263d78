"""The names the deployment files share, each derived from the files themselves and compared with its one source.

Where each name is said once (infra/README.md, "Names the files share"):
- the image: infra/Dockerfile's `# image:` line; its tag: pyproject.toml's version;
- the working directory: infra/Dockerfile's WORKDIR;
- the bucket: conf/prod.yaml's workdir;
- every service and port: the Service (or RayCluster) that defines it in infra/k8s.
Every reference is found by scanning the files (comments and examples included, since users copy them), not
listed by hand, so a new reference is checked the day it is written.
"""

from __future__ import annotations

import posixpath
import re
from fnmatch import fnmatch

from tests.infra.bundle import (
    Bundle,
    deployments,
    image_name,
    kuberay_pods,
    of_kind,
    services,
    version,
    workdir,
)

SCANNED = ("prefect.yaml", "conf/prod.yaml", "infra/")  # the texts whose references are checked
SHELL_VAR = re.compile(r"^\$\{?([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}?$")
HOST = re.compile(r"\b([a-z0-9](?:[-a-z0-9]*[a-z0-9])?)\.([a-z0-9-]+)\.svc(?:\.cluster\.local)?\b(?::(\d+))?")
PORT_FORWARD = re.compile(r"port-forward\s+(?:-n\s+\S+\s+)?(?:svc|service)/([a-z0-9-]+)\s+(\d+):([a-z0-9-]+)")
DEFAULT_PORTS = {"http": 80, "https": 443}


def _texts(b: Bundle) -> dict[str, str]:
    return {p: t for p, t in b.texts.items() if p.startswith(SCANNED)}


def _line(text: str, at: int) -> int:
    return text.count("\n", 0, at) + 1


def check_image_refs(b: Bundle) -> None:
    """Every mention of the project's image in prefect.yaml and infra/ (manifests, pool template, Dockerfile,
    README), comments and shell examples included, names it with the project version; a `$VAR` tag counts only
    where the same file sets VAR from pyproject.toml, so the version is said once."""
    name, tag = image_name(b), version(b)
    registry = name.rsplit("/", 1)[0] + "/"
    problems = []
    for path, text in _texts(b).items():
        derived = set(re.findall(r"\b([A-Za-z_][A-Za-z0-9_]*)=\$\([^)\n]*pyproject\.toml", text))
        for m in re.finditer(re.escape(registry) + r"[a-z0-9._/-]+(?::[^\s\"'`,)]+)?", text):
            ref, where = m.group(0), f"{path}:{_line(text, m.start())}"
            repo, _, ref_tag = ref.partition(":")
            if repo != name:
                problems.append(f"{where}: {ref} is not the project's image {name}")
            elif not ref_tag:
                continue  # the repository's name alone, as in the Dockerfile's `# image:` line
            elif var := SHELL_VAR.match(ref_tag):
                if var.group(1) not in derived:
                    problems.append(f"{where}: {ref} tags ${var.group(1)}, which this file does not set from "
                                    "pyproject.toml's version (a copy of it drifts)")  # fmt: skip
                elif var.group(2) not in (None, tag):
                    problems.append(f"{where}: {ref} falls back to {var.group(2)}, not {tag}")
            elif ref_tag != tag:
                problems.append(f"{where}: {ref} has tag {ref_tag}, the project version is {tag} (pyproject.toml)")
    assert not problems, "\n".join(problems)


def _dockerignore_keeps(b: Bundle, path: str) -> bool:
    """Whether the build context keeps `path` under infra/Dockerfile.dockerignore (last matching rule wins)."""
    keep = True
    for rule in b.texts.get("infra/Dockerfile.dockerignore", "").splitlines():
        rule = rule.strip()
        if not rule or rule.startswith("#"):
            continue
        negate, pattern = rule.startswith("!"), rule.lstrip("!").rstrip("/")
        if fnmatch(path, pattern) or path.startswith(pattern + "/"):
            keep = negate
    return keep


def check_workdir(b: Bundle) -> None:
    """Every deployment that runs the project's image changes into the image's WORKDIR (infra/Dockerfile), and
    its entrypoint file is there: COPYed into the WORKDIR and kept by the build context's .dockerignore."""
    wd, name = workdir(b).rstrip("/"), image_name(b)
    copied = {}
    for line in (ln for ln in b.dockerfile.splitlines() if ln.upper().startswith("COPY ") and "--from" not in ln):
        *srcs, dest = line.split()[1:]
        dest = posixpath.normpath(dest if dest.startswith("/") else f"{wd}/{dest}")
        for src in srcs:
            copied[src.rstrip("/")] = dest
    problems = []
    for dep_name, d in deployments(b).items():
        image = str((d.get("work_pool", {}).get("job_variables") or {}).get("image", ""))
        if not image.startswith(name + ":"):
            continue  # runs elsewhere (the local process pool): not in the image
        steps = [s for step in d.get("pull") or [] for k, s in step.items() if k.endswith("set_working_directory")]
        if not steps:
            problems.append(f"prefect.yaml {dep_name}: no set_working_directory pull step into {wd}")
        for s in steps:
            if s["directory"].rstrip("/") != wd:
                problems.append(f"prefect.yaml {dep_name} changes into {s['directory']}; infra/Dockerfile's "
                                f"WORKDIR is {wd}")  # fmt: skip
        entry = d["entrypoint"].split(":")[0]
        top = entry.split("/")[0]
        if copied.get(top) != f"{wd}/{top}" or not _dockerignore_keeps(b, entry):
            problems.append(f"prefect.yaml {dep_name}'s entrypoint {entry} is not in the image at {wd}/{entry}")
    assert not problems, "\n".join(problems)


def check_buckets(b: Bundle) -> None:
    """Every s3:// URL in conf/prod.yaml, prefect.yaml and infra/ (comments, examples, README) is in one bucket:
    the one conf/prod.yaml's workdir names."""
    bucket = re.match(r"s3://([^/]+)", str(b.prod.get("workdir", "")))
    assert bucket, f"conf/prod.yaml's workdir {b.prod.get('workdir')} is not an s3:// URL"
    problems = []
    for path, text in _texts(b).items():
        for m in re.finditer(r"s3://([a-z0-9][a-z0-9.-]*[a-z0-9])", text):
            if m.group(1) != bucket.group(1):
                problems.append(f"{path}:{_line(text, m.start())}: bucket {m.group(1)}, the workdir's is "
                                f"{bucket.group(1)} (conf/prod.yaml)")  # fmt: skip
    assert not problems, "\n".join(problems)


def _pods(b: Bundle) -> list[tuple[str, dict, dict]]:
    """(where, labels, pod spec) of every pod a Service could select, the Prometheus operator's included."""
    out = [(f"{d['kind']} {d['metadata']['name']}", d["spec"]["template"].get("metadata", {}).get("labels", {}),
            d["spec"]["template"]["spec"]) for d in b.docs if d["kind"] in ("Deployment", "StatefulSet")]  # fmt: skip
    out += [(f"Ray {p['group']}", p["labels"], p["spec"]) for p in kuberay_pods(b)]
    # The operator labels a Prometheus's pods `prometheus: <name>` and names its container port `web` (9090).
    out += [(f"Prometheus {d['metadata']['name']}", {"prometheus": d["metadata"]["name"]},
             {"containers": [{"ports": [{"name": "web", "containerPort": 9090}]}]})
            for d in of_kind(b, "Prometheus")]  # fmt: skip
    return out


def check_services(b: Bundle) -> None:
    """Every in-cluster host (NAME.NS.svc[.cluster.local][:PORT]) and every `kubectl port-forward svc/NAME L:R`
    in the scanned files names a Service that exists (a manifest's, or the head service KubeRay makes) and one of
    its ports; every Service selects a pod and targets a port that pod has."""
    known = services(b)
    problems = []
    for path, text in _texts(b).items():
        for m in HOST.finditer(text):
            svc, ns, port = m.group(1), m.group(2), m.group(3)
            scheme = re.search(r"([a-z+]+)://[^\s]*$", text[max(0, m.start() - 40) : m.start()])
            port = int(port) if port else DEFAULT_PORTS.get(scheme.group(1) if scheme else "")
            where = f"{path}:{_line(text, m.start())}: {m.group(0)}"
            if (svc, ns) not in known:
                problems.append(f"{where} names Service {svc} in {ns}; infra/k8s defines {sorted(n for n, _ in known)}")
            elif port is not None and port not in known[(svc, ns)].values():
                problems.append(f"{where}: Service {svc} has ports {known[(svc, ns)]}, not {port}")
        for m in PORT_FORWARD.finditer(text):
            ports = next((p for (n, _), p in known.items() if n == m.group(1)), None)
            remote = m.group(3)
            if ports is None or (remote not in ports and not (remote.isdigit() and int(remote) in ports.values())):
                problems.append(f"{path}:{_line(text, m.start())}: `{m.group(0)}`: no Service {m.group(1)} with "
                                f"port {remote}")  # fmt: skip
    pods = _pods(b)
    for d in of_kind(b, "Service"):
        sel = d["spec"].get("selector", {})
        chosen = [p for p in pods if sel and all(p[1].get(k) == v for k, v in sel.items())]
        if not chosen:
            problems.append(f"Service {d['metadata']['name']} selects {sel}: no pod has those labels")
        for p in d["spec"]["ports"]:
            target = p.get("targetPort", p["port"])
            declared = [q for _, _, spec in chosen for c in spec["containers"] for q in c.get("ports", [])]
            named = {q.get("name") for q in declared}
            if chosen and target not in named | {q["containerPort"] for q in declared}:
                problems.append(f"Service {d['metadata']['name']} targets port {target}; its pods have {sorted(named)}")
    assert not problems, "\n".join(problems)
