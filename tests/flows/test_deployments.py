"""prefect.yaml, read offline: the two deployments, their pools and parameters, and no secret in the file."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from flows import stack
from ldm.config import load_config

ROOT = Path(__file__).resolve().parents[2]


def _deployments() -> dict[str, dict]:
    return {d["name"]: d for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]}


def test_deployments_name_the_flow_the_pools_and_valid_parameters():
    """Bug caught: an entrypoint that no longer names the train-ldm flow, a pool name the stack does not create,
    or default parameters the flow would refuse (a profile that does not exist)."""
    import importlib

    deployments = _deployments()
    assert set(deployments) == {"local", "prod"}
    for d in deployments.values():
        module, _, name = d["entrypoint"].partition(":")
        flow = getattr(importlib.import_module(module.removesuffix(".py").replace("/", ".")), name)
        assert flow.name == "train-ldm"
        assert d["enforce_parameter_schema"] is True
        load_config(d["parameters"]["profile"], d["parameters"]["overrides"])  # raises ConfigError if wrong
    assert deployments["local"]["work_pool"]["name"] == stack.POOL
    prod = deployments["prod"]["work_pool"]
    assert prod["name"] == stack.PROD_POOL and prod["job_variables"]["namespace"] == "ldm"
    assert prod["job_variables"]["image"].startswith("ghcr.io/ldm-pipeline/ldm-pipeline:")


def test_prefect_yaml_holds_no_secret_and_no_endpoint():
    """Bug caught: a credential or a fixed endpoint written into the deployment file (it is committed and shown
    in the Prefect UI), or an endpoint taken from the deployer's shell: `prefect deploy` leaves a `{{ $VAR }}` the
    shell lacks as its literal text, and a job env entry shadows the cluster's ConfigMap (infra/k8s/configmap.yaml),
    the one place the endpoints are said."""
    text = (ROOT / "prefect.yaml").read_text()
    assert not re.search(r"(?i)(secret_access_key|password|session_token|://[^/\s:@]+:[^/\s@]+@)", text)
    prod = _deployments()["prod"]
    env = prod["work_pool"]["job_variables"]["env"]
    endpoints = yaml.safe_load((ROOT / "infra" / "k8s" / "configmap.yaml").read_text())["data"]
    assert not set(env) & set(endpoints), "prefect.yaml sets what the ConfigMap already gives the flow pod"
    assert not [v for v in [*env.values(), *prod["parameters"].values()] if "{{" in str(v)]
    assert "workdir" not in prod["parameters"]  # conf/prod.yaml's workdir: the bucket infra/ names
