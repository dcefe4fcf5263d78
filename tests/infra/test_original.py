"""The offline checks fail on the files as issue 26 found them (commit 2690e7b), each naming the mismatch.

A planted drift shows a check can fail on a copy; this shows it fails on the real mismatches it was written for,
read from git: the deployment that would not start as shipped. The same checks pass on today's files
(test_manifests.py), so each row is a mismatch that was there and is fixed.
"""

from __future__ import annotations

import subprocess

import pytest

from tests.infra import bundle, checks, envvars, monitoring, names

ORIGINAL = "2690e7b"  # HEAD when issue 26 was filed: the infra files exactly as the issue quotes them

MISMATCHES = [
    # (check, what its failure must say, the mismatch the issue lists)
    (checks.check_image, "prefect.yaml prod runs ghcr.io/ldm-pipeline/ldm-pipeline:latest, expected "
     "ghcr.io/ldm-pipeline/ldm-pipeline:0.1.0", "prod pulls :latest while the RayCluster runs :0.1.0"),
    (names.check_image_refs, "prefect.yaml:31: ghcr.io/ldm-pipeline/ldm-pipeline:latest has tag latest",
     "the same, found by scanning the text"),
    (names.check_image_refs, "infra/README.md:38: ghcr.io/ldm-pipeline/ldm-pipeline:$LDM_IMAGE_TAG tags "
     "$LDM_IMAGE_TAG, which this file does not set from pyproject.toml", "the README's build step tags a version "
     "of its own"),
    (names.check_workdir, "prefect.yaml prod changes into /opt/ldm-pipeline; infra/Dockerfile's WORKDIR is /app",
     "the pull step's directory is not the image's WORKDIR"),
    (names.check_buckets, "conf/prod.yaml:84: bucket ldm-prod", "the evaluation reference in s3://ldm-prod"),
    (names.check_buckets, "prefect.yaml:64: bucket ldm-prod", "prefect.yaml's comment names s3://ldm-prod/runs"),
    (checks.check_ray_endpoints, "conf/prod.yaml compute.ray_address is 'auto'", "`auto` counts as no cluster"),
    (envvars.check_flow_endpoints, "with conf/prod.yaml alone, flows/endpoints.py sends the Ray stages to this "
     "process", "without RAY_ADDRESS the Ray stages run inside the flow pod"),
    (checks.check_ray_endpoints, "ConfigMap ldm-endpoints RAY_ADDRESS is 'ray://", "RAY_ADDRESS is a client "
     "address, the job API needs the dashboard"),
    (envvars.check_env_read, "ConfigMap ldm-endpoints sets RAY_DASHBOARD_URL, which neither the code",
     "RAY_DASHBOARD_URL is read nowhere"),
    (envvars.check_env_paths, "RAY_AUTH_TOKEN_PATH=/var/run/secrets/ray/auth_token names a file nothing mounts",
     "RAY_AUTH_TOKEN_PATH names a file nothing mounts"),
    (envvars.check_ray_auth, "the RayCluster names no token Secret", "the cluster's token is nobody's"),
    (envvars.check_flow_endpoints, "MLFLOW_TRACKING_URI is ignored: conf/prod.yaml pins tracking.uri",
     "MLFLOW_TRACKING_URI is ignored"),
    (envvars.check_flow_endpoints, "bypassing the MLflow server's --artifacts-destination",
     "the experiment's artifact location bypasses the server"),
    (names.check_services, "prefect.yaml:36: raycluster-ldm-head-svc.ldm.svc:8265 names Service "
     "raycluster-ldm-head-svc", "the example service name is not the configmap's"),
    (envvars.check_deploy_env, "job env RAY_ADDRESS={{ $RAY_ADDRESS }} is deployed as written when the deployer's "
     "shell lacks it, shadowing the ConfigMap's", "deploy-time endpoints shadow the ConfigMap"),
    (monitoring.check_pod_monitors, "no PodMonitor scrapes Ray headgroup", "nothing scrapes the metrics port"),
    (monitoring.check_grafana, "the Ray head sets no http:// RAY_PROMETHEUS_HOST", "no Metrics view"),
]  # fmt: skip


@pytest.fixture(scope="module")
def original() -> bundle.Bundle:
    """The files at ORIGINAL, read from git."""
    try:
        return bundle.load(ORIGINAL)
    except (subprocess.CalledProcessError, FileNotFoundError, ValueError):
        pytest.skip(f"needs the repository's history with commit {ORIGINAL} (git, not a shallow copy)")


@pytest.mark.parametrize("check,says,mismatch", MISMATCHES, ids=[m[2] for m in MISMATCHES])
def test_check_fails_on_the_original_files(original, check, says, mismatch):
    """Each mismatch issue 26 lists makes its check fail on the files as they were, with a message naming it."""
    try:
        with pytest.raises(AssertionError) as failed:
            check(original)
    except ImportError as e:  # the original flows/endpoints.py or ldm/tracking.py no longer imports today's tree
        pytest.skip(f"the code at {ORIGINAL} no longer runs against today's library: {e}")
    assert says in str(failed.value), str(failed.value)
