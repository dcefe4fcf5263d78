"""Environment variables: what infra sets against what the code reads, and what the flow pod's code makes of them.

The code's reads are found statically (os.environ.get / [] / in, os.getenv, in flows/, ldm/ and data_prep/), the
libraries' in the sources of the packages the image installs (pyproject's dependencies and the Dockerfile's
extras, with their dependencies). The endpoint checks run the bundle's own flows/endpoints.py and
ldm/tracking.py in the environment the flow pod gets from infra (ConfigMap, Secrets, pool template, prefect.yaml).
"""

from __future__ import annotations

import ast
import contextlib
import functools
import os
import re
import types
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from urllib.parse import urlsplit

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from tests.infra.bundle import (
    ROOT,
    Bundle,
    container_env,
    containers,
    deployments,
    endpoints,
    flow_container,
    head_service,
    image_name,
    job_variables,
    of_kind,
    one,
    pod_specs,
    raycluster,
    workdir,
)

ENDPOINT_NAME = re.compile(r"ADDRESS|_URL|_URI|ENDPOINT|_HOST|TOKEN")  # variables that say where a service is
READ_CALLS = {"get", "getenv", "setdefault", "pop"}
ABS_PATH = re.compile(r"^/[^\s:]*$")
TEMPLATE = re.compile(r"\{\{\s*\$([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


# --- what the code reads ---------------------------------------------------------------------------------


def _is_environ(node: ast.AST) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "environ" and isinstance(node.value, ast.Name)
            and node.value.id == "os") or (isinstance(node, ast.Name) and node.id == "environ")  # fmt: skip


def _reads_in(node: ast.AST, consts: dict[str, str]) -> Iterator[tuple[str, int]]:
    """(variable, line) of every environment read under `node`."""

    def name(arg: ast.AST) -> str | None:
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            return arg.value
        return consts.get(arg.id) if isinstance(arg, ast.Name) else None

    for n in ast.walk(node):
        key = None
        if isinstance(n, ast.Call) and n.args:
            f = n.func
            environ_call = isinstance(f, ast.Attribute) and f.attr in READ_CALLS and _is_environ(f.value)
            getenv = getattr(f, "attr", getattr(f, "id", None)) == "getenv"
            if environ_call or getenv:
                key = name(n.args[0])
        elif isinstance(n, ast.Subscript) and isinstance(n.ctx, ast.Load) and _is_environ(n.value):
            key = name(n.slice)
        elif isinstance(n, ast.Compare) and isinstance(n.ops[0], ast.In | ast.NotIn) and _is_environ(n.comparators[0]):
            key = name(n.left)
        if key:
            yield key, n.lineno


@functools.lru_cache(maxsize=1024)
def _parse(text: str) -> ast.Module:
    return ast.parse(text)


def code_reads(b: Bundle) -> tuple[dict[str, list[str]], list[set[str]]]:
    """The variables the code reads (name -> ["path:line"]) and the groups read as alternatives (`a or b`)."""
    where: dict[str, list[str]] = {}
    groups: list[set[str]] = []
    for path, text in b.sources.items():
        tree = _parse(text)
        consts = {t.id: n.value.value for n in tree.body if isinstance(n, ast.Assign)
                  and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)
                  for t in n.targets if isinstance(t, ast.Name)}  # fmt: skip
        for key, line in _reads_in(tree, consts):
            where.setdefault(key, []).append(f"{path}:{line}")
        for n in ast.walk(tree):
            if isinstance(n, ast.BoolOp) and isinstance(n.op, ast.Or):
                names = {k for k, _ in _reads_in(n, consts)}
                if len(names) > 1:
                    groups.append(names)
        # X and X_PATH, X_S3, ... read by one module: one setting, by value or by file, in general or per service
        names = {k for k, _ in _reads_in(tree, consts)}
        groups += [{k, v} for k in names for v in names if v.startswith(k + "_")]
    return where, groups


def _image_requirements(b: Bundle) -> list[str]:
    """What the image installs: pyproject's dependencies and the Dockerfile's `uv pip install` requirements."""
    reqs = list(b.pyproject["project"]["dependencies"])
    for line in re.findall(r"uv pip install ([^\n&]+)", b.dockerfile):
        reqs += [t.strip("\"'") for t in line.split() if not t.startswith(("-", "$", '"$', "."))]
    return reqs


@functools.cache
def _library_files(requirements: tuple[str, ...]) -> tuple[Path, ...]:
    """The .py files of the installed distributions these requirements pull in (their dependencies, and those
    of the extras they ask for, included)."""
    seen, files, todo = set(), [], list(requirements)
    while todo:
        try:
            req = Requirement(todo.pop())
        except InvalidRequirement:
            continue
        key = canonicalize_name(req.name)
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            continue
        files += [Path(dist.locate_file(f)) for f in dist.files or [] if f.suffix == ".py"]
        for r in map(Requirement, dist.requires or []):
            if r.marker is None or any(r.marker.evaluate({"extra": e}) for e in {"", *req.extras}):
                todo.append(r.name + (f"[{','.join(sorted(r.extras))}]" if r.extras else ""))
    return tuple(files)


@functools.cache
def _quoted_names(files: tuple[Path, ...]) -> frozenset[str]:
    """Every quoted UPPER_CASE name in these files: the environment variables a library can read by name."""
    pattern = re.compile(rb"[\"']([A-Z][A-Z0-9_]{2,})[\"']")
    found: set[bytes] = set()
    for f in files:
        with contextlib.suppress(OSError):
            found.update(pattern.findall(f.read_bytes()))
    return frozenset(n.decode() for n in found)


def library_reads(b: Bundle, names: set[str]) -> set[str]:
    """Those of `names` that a library in the image names as a string (its way of reading the variable)."""
    return names & _quoted_names(_library_files(tuple(_image_requirements(b))))


# --- what infra sets -------------------------------------------------------------------------------------


def _ours(b: Bundle, c: dict) -> bool:
    """Whether the container runs the project's image (the pool template's `{{ image }}` defaults to it)."""
    return str(c.get("image", "")).startswith(image_name(b) + ":") or c.get("image") == "{{ image }}"


def infra_sets(b: Bundle) -> list[tuple[str, str, dict | None]]:
    """(where, variable, container) of every variable infra gives a process of the project's image: the
    ConfigMaps they load, their `env` lists, the pool's env default and prefect.yaml's job env for prod."""
    out: list[tuple[str, str, dict | None]] = []
    loaded = {s["configMapRef"]["name"] for _, c in containers(b) if _ours(b, c) for s in c.get("envFrom", [])
              if "configMapRef" in s}  # fmt: skip
    for d in of_kind(b, "ConfigMap"):
        if d["metadata"]["name"] in loaded:
            out += [(f"ConfigMap {d['metadata']['name']}", k, None) for k in d.get("data", {})]
    for where, c in containers(b):
        if _ours(b, c):
            out += [(where, e["name"], c) for e in c.get("env", []) if isinstance(c.get("env"), list)]
    pool_env = b.pool["variables"]["properties"]["env"].get("default") or {}
    out += [("work pool env default", k, None) for k in pool_env]
    out += [("prefect.yaml prod job env", k, None) for k in job_variables(b).get("env") or {}]
    return out


def check_env_read(b: Bundle) -> None:
    """Every variable infra sets for the project's image is read: by the code, by a library in the image, or by
    the same container's other values ($(VAR)); a variable nothing reads is a name that drifted."""
    sets = infra_sets(b)
    reads, _ = code_reads(b)
    libs = library_reads(b, {n for _, n, _ in sets} - set(reads))
    problems = []
    for where, var, c in sets:
        used_here = c is not None and f"$({var})" in str([c.get("env"), c.get("args"), c.get("command")])
        if var not in reads and var not in libs and not used_here:
            problems.append(f"{where} sets {var}, which neither the code (flows/, ldm/, data_prep/) nor a library "
                            "in the image reads")  # fmt: skip
    assert not problems, "\n".join(problems)


def flow_env(b: Bundle) -> dict[str, str]:
    """The environment of train-ldm/prod's flow-run pod, as Kubernetes builds it from the files."""
    return container_env(b, flow_container(b))


def check_env_endpoints_set(b: Bundle) -> None:
    """Every endpoint variable the code reads (a name saying where a service is: *_URL, *_URI, *ADDRESS, *_HOST,
    *TOKEN*) is set in the flow-run pod, or one of its alternatives is: names read in one `a or b`, or X and
    X_SUFFIX read by one module (RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH, AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3)."""
    reads, groups = code_reads(b)
    env = flow_env(b)
    problems = []
    for var in sorted(v for v in reads if ENDPOINT_NAME.search(v)):
        alternatives = set().union({var}, *(g for g in groups if var in g))
        if not alternatives & set(env):
            problems.append(f"the code reads {var} ({reads[var][0]}) and infra never sets it (nor "
                            f"{sorted(alternatives - {var})}) in the flow-run pod")  # fmt: skip
    assert not problems, "\n".join(problems)


def check_deploy_env(b: Bundle) -> None:
    """prefect.yaml's deployments of the image take nothing from the deployer's shell: `prefect deploy` leaves a
    `{{ $VAR }}` the shell lacks as its literal text, and a job env entry shadows the ConfigMap's value."""
    loaded = container_env(b, {"envFrom": flow_container(b).get("envFrom", [])}, image_too=False)
    problems = []
    for name, d in deployments(b).items():
        if not str(job_variables(b, name).get("image", "")).startswith(image_name(b) + ":"):
            continue
        for key, value in (job_variables(b, name).get("env") or {}).items():
            if TEMPLATE.search(str(value)):
                shadows = f", shadowing the ConfigMap's {loaded[key]}" if key in loaded else ""
                problems.append(f"prefect.yaml {name}: job env {key}={value} is deployed as written when the "
                                f"deployer's shell lacks it{shadows}")  # fmt: skip
        for key, value in (d.get("parameters") or {}).items():
            if TEMPLATE.search(str(value)):
                problems.append(f"prefect.yaml {name}: parameter {key}={value} depends on the deployer's shell")
    assert not problems, "\n".join(problems)


def _mounted_file(b: Bundle, spec: dict, c: dict, path: str, wd: str | None) -> str | None:
    """None if `path` lies under one of the container's mounts (a Secret / ConfigMap mount: one of the files it
    makes, its items or else all its keys), or under the image's working directory; else why not."""
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    data = {(d["kind"], d["metadata"]["name"]): {**d.get("data", {}), **d.get("stringData", {})}
            for d in b.docs if d["kind"] in ("Secret", "ConfigMap")}  # fmt: skip
    for m in sorted(c.get("volumeMounts", []), key=lambda m: -len(m["mountPath"])):
        root = m["mountPath"].rstrip("/")
        if path != root and not path.startswith(root + "/"):
            continue
        v, rest = volumes.get(m["name"], {}), path[len(root) + 1 :].split("/")[0]
        refs = [(k, v[k]) for k in ("secret", "configMap") if k in v]
        refs += [
            (k, s[k]) for s in v.get("projected", {}).get("sources", []) for k in ("secret", "configMap") if k in s
        ]
        keys = {i["path"] for _, r in refs for i in r.get("items", [])}
        keys |= {k for kind, r in refs if not r.get("items")
                 for k in data.get((kind[0].upper() + kind[1:], r.get("secretName") or r.get("name")), {})}  # fmt: skip
        if refs and rest and rest not in keys:
            return f"{m['name']} at {root} holds {sorted(keys)}, not {rest}"
        return None
    if wd and (path == wd or path.startswith(wd.rstrip("/") + "/")):
        return None
    return "no volume is mounted there"


def check_env_paths(b: Bundle) -> None:
    """Every variable infra sets to a file path names a file the pod has: under one of its container's mounts
    (for a Secret or ConfigMap, one of the keys it mounts) or inside the image's working directory."""
    problems = []
    specs = pod_specs(b)
    flow_spec = specs[-1][1]
    pods = [(w, spec, c) for w, spec in specs for c in spec["containers"]]
    pods[-1] = (specs[-1][0], flow_spec, flow_container(b))  # the pool's container as prefect.yaml fills it
    for where, spec, c in pods:
        wd = workdir(b) if _ours(b, c) else None
        for var, value in container_env(b, c, image_too=False).items():
            if ABS_PATH.match(value) and (why := _mounted_file(b, spec, c, value, wd)):
                problems.append(f"{where}/{c['name']}: {var}={value} names a file nothing mounts ({why})")
    assert not problems, "\n".join(problems)


def check_ray_auth(b: Bundle) -> None:
    """The flow-run pod holds the Ray cluster's token: the RayCluster names its token Secret (authOptions) and
    the pod reads that Secret's auth_token, by RAY_AUTH_TOKEN or by a mounted RAY_AUTH_TOKEN_PATH."""
    auth = raycluster(b)["spec"].get("authOptions") or {}
    secret = auth.get("secretName")
    assert auth.get("mode") == "token" and secret, (
        "the RayCluster names no token Secret (authOptions: {mode: token, secretName}): the flow pod's token "
        f"({sorted(k for k in flow_env(b) if k.startswith('RAY_AUTH_TOKEN'))}) would match no cluster's"
    )
    c, spec = flow_container(b), pod_specs(b)[-1][1]
    by_env = [e for e in c.get("env", []) if e["name"] == "RAY_AUTH_TOKEN"
              and e.get("valueFrom", {}).get("secretKeyRef", {}) == {"name": secret, "key": "auth_token"}]  # fmt: skip
    path = flow_env(b).get("RAY_AUTH_TOKEN_PATH", "")
    mounts = {m["name"]: m["mountPath"].rstrip("/") for m in c.get("volumeMounts", [])}
    by_file = [v for v in spec.get("volumes", []) if v.get("secret", {}).get("secretName") == secret
               and path == f"{mounts.get(v['name'])}/auth_token"]  # fmt: skip
    assert by_env or by_file, f"the flow pod reads no Ray token from Secret {secret} (RayCluster authOptions)"


# --- what the flow pod's code makes of it ----------------------------------------------------------------


@contextlib.contextmanager
def environ(env: dict[str, str]) -> Iterator[None]:
    """os.environ replaced by `env` for the duration."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def module(b: Bundle, path: str) -> types.ModuleType:
    """The bundle's version of one of the project's modules (its imports resolve against today's tree)."""
    mod = types.ModuleType(path.removesuffix(".py").replace("/", ".") + "_under_check")
    mod.__file__ = str(ROOT / path)
    exec(compile(b.sources[path], path, "exec"), mod.__dict__)  # noqa: S102 - the project's own source
    return mod


def _cfg(prod: dict) -> types.SimpleNamespace:
    """conf/prod.yaml as the attribute tree the endpoint functions read (fields they default, defaulted)."""

    def ns(d: dict) -> types.SimpleNamespace:
        return types.SimpleNamespace(**{k: ns(v) if isinstance(v, dict) else v for k, v in d.items()})

    cfg = ns(prod)
    cfg.tracking.uri = getattr(cfg.tracking, "uri", None)
    cfg.compute.ray_address = getattr(cfg.compute, "ray_address", None)
    cfg.precompute = getattr(cfg, "precompute", types.SimpleNamespace(resolution=None))
    return cfg


def check_flow_endpoints(b: Bundle) -> None:
    """Run as the flow pod, with prod.yaml: the Ray stages go to the head's job API (from RAY_ADDRESS, and from
    prod.yaml alone); MLFLOW_TRACKING_URI takes effect; experiments leave artifacts to the MLflow server that
    serves them (--serve-artifacts), instead of a location that bypasses its --artifacts-destination."""
    ep, tracking = module(b, "flows/endpoints.py"), module(b, "ldm/tracking.py")
    rc, cfg, env = raycluster(b), _cfg(b.prod), flow_env(b)
    service, ports = head_service(b)
    job_api = f"http://{service}.{rc['metadata']['namespace']}.svc.cluster.local:{ports.get('dashboard')}"
    problems = []
    for label, with_env in (("the flow pod's environment", env), ("conf/prod.yaml alone", {})):
        with environ(with_env):
            address = ep.ray_address(cfg)
            url = ep.dashboard_url(address) if address else None
        if url != job_api:
            problems.append(
                f"with {label}, flows/endpoints.py sends the Ray stages to {url or 'this process'} "
                f"(address {address!r}, compute.ray_address {cfg.compute.ray_address!r}), not {job_api}"
            )
        elif not str(address).startswith("http"):
            problems.append(f"with {label}, the Ray address {address!r} is not the job API: its dashboard port "
                            "is guessed")  # fmt: skip
    probe = "http://probe.invalid:5000"
    with environ({**env, "MLFLOW_TRACKING_URI": probe}):
        overrides = ep.env_overrides(cfg)
    if f"tracking.uri={probe}" not in overrides:
        problems.append(f"MLFLOW_TRACKING_URI is ignored: conf/prod.yaml pins tracking.uri {cfg.tracking.uri} and "
                        f"env_overrides keeps it ({overrides})")  # fmt: skip
    uri = env.get("MLFLOW_TRACKING_URI") or cfg.tracking.uri
    if endpoints(b).get("MLFLOW_TRACKING_URI") not in (None, uri):
        problems.append(f"the flow pod tracks to {uri}, the ConfigMap names {endpoints(b)['MLFLOW_TRACKING_URI']}")
    server = one(b, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
    cfg.tracking.uri = endpoints(b).get("MLFLOW_TRACKING_URI") or cfg.tracking.uri  # the in-cluster server
    if "--serve-artifacts" in server.get("args", []) and urlsplit(str(cfg.tracking.uri)).scheme in ("http", "https"):
        with environ(env):
            root = tracking.artifact_root(cfg)
        if root is not None:
            problems.append(f"ldm/tracking.py creates experiments at {root}, bypassing the MLflow server's "
                            "--artifacts-destination (it serves artifacts: leave the location to it)")  # fmt: skip
    assert not problems, "\n".join(problems)
