"""The Ray dashboard's Metrics view on prod: PodMonitors that select the RayCluster's pods and scrape ports those
pods have, a Prometheus that selects the monitors, Grafana provisioned with that Prometheus and with the dashboards
Ray itself writes, and the head told where both are (RAY_PROMETHEUS_HOST, RAY_GRAFANA_HOST,
RAY_GRAFANA_IFRAME_HOST). Ray's own numbers (metrics ports, datasource name, dashboard files) are read from the
installed Ray, so a Ray upgrade that moves one fails here.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from tests.infra.bundle import KUBERAY_METRICS_PORT, Bundle, kuberay_pods, of_kind, raycluster, services

RAY_DASHBOARDS = "/tmp/ray/session_latest/metrics/grafana/dashboards"  # where the head writes them (Ray, KubeRay docs)
PROVISIONING = "/etc/grafana/provisioning"  # the Grafana image's GF_PATHS_PROVISIONING


def ray_source(relative: str) -> str:
    """A file of the installed Ray package."""
    return (Path(importlib.util.find_spec("ray").origin).parent / relative).read_text()


def ray_constant(relative: str, name: str) -> str:
    """A constant's default in the installed Ray (`NAME = "x"` or `NAME = env_integer("NAME", 123)`)."""
    m = re.search(rf"^{name}\s*=\s*(?:env_integer\(\s*\"\w+\",\s*)?\"?([^\"\)\n]+)", ray_source(relative), re.M)
    assert m, f"ray/{relative} no longer defines {name}"
    return m.group(1).strip()


def _matches(selector: dict, labels: dict) -> bool:
    assert not selector.get("matchExpressions"), "matchExpressions: not checked here, use matchLabels"
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


def _head_env(b: Bundle) -> dict[str, str]:
    head = raycluster(b)["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", "") for e in head.get("env", [])}


def check_pod_monitors(b: Bundle) -> None:
    """Every PodMonitor is selected by a Prometheus, selects pods of the RayCluster (KubeRay's labels, its
    namespace) and scrapes ports those pods name; every Ray pod group is scraped; the ports are the ones Ray
    listens on (KubeRay's metrics-export-port, Ray's autoscaler and dashboard metrics ports)."""
    rc, pods = raycluster(b), kuberay_pods(b)
    ns = rc["metadata"]["namespace"]
    want = {"metrics": int(rc["spec"]["headGroupSpec"]["rayStartParams"].get("metrics-export-port",
                                                                            KUBERAY_METRICS_PORT)),
            "as-metrics": int(ray_constant("autoscaler/_private/constants.py", "AUTOSCALER_METRIC_PORT")),
            "dash-metrics": int(ray_constant("dashboard/consts.py", "DASHBOARD_METRIC_PORT"))}  # fmt: skip
    problems, scraped = [], set()
    for m in of_kind(b, "PodMonitor"):
        name, spec, m_ns = m["metadata"]["name"], m["spec"], m["metadata"].get("namespace")
        chosen_by = [
            p
            for p in of_kind(b, "Prometheus")
            if p["metadata"].get("namespace") == m_ns
            and _matches(p["spec"].get("podMonitorSelector") or {}, m["metadata"].get("labels", {}))
        ]
        if not chosen_by:  # no podMonitorNamespaceSelector: a Prometheus reads monitors of its own namespace only
            problems.append(f"PodMonitor {name}: no Prometheus in {m_ns} selects its labels")
        names = spec.get("namespaceSelector", {})
        if not names.get("any") and ns not in names.get("matchNames", [m_ns]):
            problems.append(f"PodMonitor {name} looks in namespaces {names}, the RayCluster is in {ns}")
        selected = [p for p in pods if _matches(spec.get("selector", {}), p["labels"])]
        if not selected:
            problems.append(f"PodMonitor {name} selects {spec.get('selector')}: no pod of RayCluster "
                            f"{rc['metadata']['name']} has those labels")  # fmt: skip
        for pod in selected:
            scraped.add(pod["group"])
            ports = {q.get("name"): q["containerPort"] for c in pod["spec"]["containers"] for q in c.get("ports", [])}
            for endpoint in spec.get("podMetricsEndpoints", []):
                port = endpoint.get("port")
                if port not in ports:
                    problems.append(f"PodMonitor {name} scrapes port {port}; Ray {pod['group']} names {sorted(ports)}")
                elif port in want and ports[port] != want[port]:
                    problems.append(f"Ray {pod['group']}'s port {port} is {ports[port]}, Ray serves it on {want[port]}")
    for pod in pods:
        if pod["group"] not in scraped:
            problems.append(f"no PodMonitor scrapes Ray {pod['group']}")
    assert not problems, "\n".join(problems)


def _service_of(b: Bundle, url: str) -> tuple[str, int] | None:
    """(Service name, port) of an in-cluster URL whose Service exists, else None."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    name, _, rest = host.partition(".")
    ns = rest.split(".")[0]
    ports = services(b).get((name, ns), {})
    return (name, parts.port or 80) if (parts.port or 80) in ports.values() else None


def _selected(b: Bundle, service: str) -> list[dict]:
    (svc,) = [d for d in of_kind(b, "Service") if d["metadata"]["name"] == service] or [{}]
    sel = svc.get("spec", {}).get("selector", {})
    deps = [
        d
        for d in of_kind(b, "Deployment")
        if sel and all(d["spec"]["template"]["metadata"].get("labels", {}).get(k) == v for k, v in sel.items())
    ]
    proms = [p for p in of_kind(b, "Prometheus") if sel == {"prometheus": p["metadata"]["name"]}]
    return deps + proms


def _provisioned(b: Bundle, dep: dict) -> dict[str, str]:
    """Grafana's provisioning files: mount path -> text, from the ConfigMaps the container mounts there."""
    spec = dep["spec"]["template"]["spec"]
    maps = {d["metadata"]["name"]: d.get("data", {}) for d in of_kind(b, "ConfigMap")}
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    out = {}
    for m in spec["containers"][0].get("volumeMounts", []):
        data = maps.get(volumes.get(m["name"], {}).get("configMap", {}).get("name"), {})
        if m["mountPath"].startswith(PROVISIONING) and data:
            files = {m["mountPath"]: data[m["subPath"]]} if "subPath" in m else \
                {f"{m['mountPath']}/{k}": v for k, v in data.items()}  # fmt: skip
            out.update(files)
    return out


def check_grafana(b: Bundle) -> None:
    """The head's RAY_PROMETHEUS_HOST and RAY_GRAFANA_HOST are Services in front of the Prometheus and the Grafana;
    Grafana's default datasource is that Prometheus under the name Ray's dashboards ask for; its dashboards are
    the files Ray writes in the head pod, copied into ConfigMaps by infra/README.md's steps and mounted where
    its provider reads; RAY_GRAFANA_IFRAME_HOST is where the README's port-forward serves Grafana."""
    env, problems = _head_env(b), []
    for var in ("RAY_PROMETHEUS_HOST", "RAY_GRAFANA_HOST", "RAY_GRAFANA_IFRAME_HOST"):
        if not env.get(var, "").startswith("http://"):
            problems.append(f"the Ray head sets no http:// {var} (its Metrics view stays empty)")
    assert not problems, "\n".join(problems)
    prom, graf = _service_of(b, env["RAY_PROMETHEUS_HOST"]), _service_of(b, env["RAY_GRAFANA_HOST"])
    if not prom or not [p for p in _selected(b, prom[0]) if p["kind"] == "Prometheus"]:
        problems.append(f"RAY_PROMETHEUS_HOST {env['RAY_PROMETHEUS_HOST']} is no Service of a Prometheus")
    grafanas = [d for d in _selected(b, graf[0]) if d["kind"] == "Deployment"] if graf else []
    if not grafanas:
        problems.append(f"RAY_GRAFANA_HOST {env['RAY_GRAFANA_HOST']} is no Service of a Grafana Deployment")
    for dep in grafanas:
        files = _provisioned(b, dep)
        sources = [s for path, t in files.items() if "/datasources/" in path for s in yaml.safe_load(t)["datasources"]]
        name = env.get("RAY_PROMETHEUS_NAME") or ray_constant("dashboard/modules/metrics/metrics_head.py",
                                                              "DEFAULT_PROMETHEUS_NAME")  # fmt: skip
        if not [s for s in sources if s["type"] == "prometheus" and s["url"] == env["RAY_PROMETHEUS_HOST"]
                and s["name"] == name and s.get("isDefault")]:  # fmt: skip
            problems.append(
                f"Grafana {dep['metadata']['name']}'s default datasource is not Prometheus "
                f"{env['RAY_PROMETHEUS_HOST']} named {name!r} (RAY_PROMETHEUS_NAME): {sources}"
            )
        problems += _dashboard_problems(b, dep, files)
    iframe = urlsplit(env["RAY_GRAFANA_IFRAME_HOST"])
    forwards = re.findall(rf"port-forward\s+svc/{graf[0] if graf else '-'}\s+(\d+):", b.readme)
    if iframe.hostname in ("127.0.0.1", "localhost") and str(iframe.port) not in forwards:
        problems.append(f"RAY_GRAFANA_IFRAME_HOST {iframe.geturl()}: infra/README.md forwards no local port "
                        f"{iframe.port} to the Grafana Service (it forwards {forwards})")  # fmt: skip
    assert not problems, "\n".join(problems)


def _dashboard_problems(b: Bundle, dep: dict, files: dict[str, str]) -> list[str]:
    spec, problems = dep["spec"]["template"]["spec"], []
    paths = [p["options"]["path"] for path, t in files.items() if "/dashboards/" in path
             for p in yaml.safe_load(t)["providers"] if p.get("type") == "file"]  # fmt: skip
    mounts = {m["mountPath"].rstrip("/"): m["name"] for m in spec["containers"][0].get("volumeMounts", [])}
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    ray_files = set(re.findall(r"\"(\w+_grafana_dashboard\.json)\"",
                               ray_source("dashboard/modules/metrics/metrics_head.py")))  # fmt: skip
    made = dict(re.findall(r"create configmap ([a-z0-9-]+)\s+--from-file=(\S+)", b.readme))
    if RAY_DASHBOARDS not in b.readme:
        problems.append(f"infra/README.md does not copy the dashboards from the head pod's {RAY_DASHBOARDS}")
    if not paths:
        problems.append(f"Grafana {dep['metadata']['name']} provisions no dashboard folder")
    for path in paths:
        v = volumes.get(mounts.get(path.rstrip("/")), {})
        maps = [s["configMap"]["name"] for s in v.get("projected", {}).get("sources", []) if "configMap" in s]
        maps += [v["configMap"]["name"]] if "configMap" in v else []
        if not maps:
            problems.append(f"Grafana's dashboard folder {path} is not a mount of dashboard ConfigMaps")
        for cm in maps:
            source = Path(made.get(cm, "")).name
            if source not in ray_files:
                problems.append(f"ConfigMap {cm} (Grafana's {path}) is not made by infra/README.md from a dashboard "
                                f"the installed Ray writes ({sorted(ray_files)}): {made.get(cm)}")  # fmt: skip
    return problems
