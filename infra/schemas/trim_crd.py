"""Write <kind>.schema.json: a CRD's spec schema, large embedded Kubernetes types cut out, unknown fields refused.

Cut out are the parts the tests validate otherwise or that the manifests do not use: the RayCluster's pod
templates (checked as built-in `PodTemplate`s with kubernetes-validate; the full CRD is 0.9 MB) and the
Prometheus's embedded pod-level Kubernetes types and features this repository leaves unset (its CRD is 0.8 MB).
Objects that list their properties get `additionalProperties: false`, so a misspelt field (`minReplica`,
`podMonitorSelecter`) fails offline where the API server would silently prune it. Regenerate when a version in
infra/README.md moves:

    git show <kuberay-commit>:ray-operator/config/crd/bases/ray.io_rayclusters.yaml > /tmp/rayclusters.yaml
    python infra/schemas/trim_crd.py /tmp/rayclusters.yaml \
        ray-project/kuberay@<commit>:ray-operator/config/crd/bases/ray.io_rayclusters.yaml
    git show <tag>:example/prometheus-operator-crd/monitoring.coreos.com_podmonitors.yaml > /tmp/podmonitors.yaml
    python infra/schemas/trim_crd.py /tmp/podmonitors.yaml \
        prometheus-operator/prometheus-operator@<tag>:example/prometheus-operator-crd/monitoring.coreos.com_podmonitors.yaml
    (and the same for monitoring.coreos.com_prometheuses.yaml)
"""

import json
import sys
from pathlib import Path

import yaml

CUT = {  # per kind: properties replaced by a bare `object` / `array`
    "RayCluster": {"template", "headService"},  # pod templates (checked as PodTemplate) and a whole Service spec
    "PodMonitor": set(),
    "Prometheus": {
        # embedded Kubernetes types: pod parts this repository does not set
        "containers", "initContainers", "volumes", "volumeMounts", "affinity", "tolerations",
        "topologySpreadConstraints", "storage", "hostAliases", "dnsConfig", "podMetadata", "imagePullSecrets",
        "persistentVolumeClaimRetentionPolicy", "securityContext",
        # Prometheus features left unset here
        "remoteWrite", "remoteRead", "alerting", "thanos", "additionalScrapeConfigs", "scrapeClasses", "web",
        "tracingConfig", "tsdb", "otlp", "rules", "query", "exemplars", "runtime", "excludedFromEnforcement",
    },
}  # fmt: skip


def trim(node: dict, cut: set[str]) -> dict:
    """The schema node with the cut properties replaced by their bare type and closed objects made strict."""
    out = {k: v for k, v in node.items() if k != "description"}
    if "properties" in node:
        out["properties"] = {
            k: ({"type": v.get("type", "object")} if k in cut else trim(v, cut)) for k, v in node["properties"].items()
        }
        if not node.get("x-kubernetes-preserve-unknown-fields"):
            out.setdefault("additionalProperties", False)
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            out[key] = trim(node[key], cut)
    return out


def main(crd_path: str, source: str) -> None:
    """Read the CRD YAML and write the trimmed schema of its storage version next to this file."""
    crd = yaml.safe_load(Path(crd_path).read_text())
    version = next(v for v in crd["spec"]["versions"] if v.get("storage"))
    kind, group = crd["spec"]["names"]["kind"], crd["spec"]["group"]
    spec = trim(version["schema"]["openAPIV3Schema"]["properties"]["spec"], CUT[kind])
    schema = {
        "$comment": f"{kind} {group}/{version['name']} spec from {source}, trimmed by infra/schemas/trim_crd.py",
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": f"{group}/{version['name']}"},
            "kind": {"const": kind},
            "metadata": {"type": "object"},
            "spec": spec,
        },
    }
    out = Path(__file__).with_name(f"{kind.lower()}.schema.json")
    out.write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:3])
