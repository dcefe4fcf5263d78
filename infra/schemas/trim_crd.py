"""Write raycluster.schema.json: the KubeRay RayCluster CRD spec schema, pod templates cut out, unknown fields refused.

The pod templates (head, workers) are validated separately as built-in `PodTemplate`s with kubernetes-validate,
so only KubeRay's own fields are kept here (the full CRD is 0.9 MB). Objects that list their properties get
`additionalProperties: false`, so a misspelt field (`minReplica`, `rayStartParam`) fails offline where the API
server would silently prune it. Regenerate when the KubeRay version in infra/README.md moves:

    git show <kuberay-commit>:ray-operator/config/crd/bases/ray.io_rayclusters.yaml > /tmp/crd.yaml
    python infra/schemas/trim_crd.py /tmp/crd.yaml <kuberay-commit>
"""

import json
import sys
from pathlib import Path

import yaml

CUT = {"template", "headService"}  # pod templates (checked as PodTemplate) and a whole Service spec


def trim(node: dict) -> dict:
    """The schema node with pod templates replaced by `object` and closed objects made strict."""
    out = {k: v for k, v in node.items() if k != "description"}
    if "properties" in node:
        out["properties"] = {k: ({"type": "object"} if k in CUT else trim(v)) for k, v in node["properties"].items()}
        if not node.get("x-kubernetes-preserve-unknown-fields"):
            out.setdefault("additionalProperties", False)
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            out[key] = trim(node[key])
    return out


def main(crd_path: str, commit: str) -> None:
    """Read the CRD YAML and write the trimmed schema of its storage version next to this file."""
    crd = yaml.safe_load(Path(crd_path).read_text())
    version = next(v for v in crd["spec"]["versions"] if v.get("storage"))
    spec = trim(version["schema"]["openAPIV3Schema"]["properties"]["spec"])
    schema = {
        "$comment": f"KubeRay {crd['spec']['group']}/{version['name']} RayCluster spec from "
        f"ray-operator/config/crd/bases/ray.io_rayclusters.yaml at ray-project/kuberay@{commit}, "
        "trimmed by infra/schemas/trim_crd.py",
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": f"{crd['spec']['group']}/{version['name']}"},
            "kind": {"const": crd["spec"]["names"]["kind"]},
            "metadata": {"type": "object"},
            "spec": spec,
        },
    }
    Path(__file__).with_name("raycluster.schema.json").write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:3])
