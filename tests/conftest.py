"""Shared fixtures: the test profile, one real ingest run, and a moto S3 server on 127.0.0.1."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.helpers import free_port, make_config


@pytest.fixture(scope="session")
def ingested(tmp_path_factory):
    """One uninterrupted ingest of the test profile's synthetic source: (config, manifest)."""
    from flows.registry import run as run_stage

    cfg = make_config(tmp_path_factory.mktemp("ingested"))
    return cfg, run_stage("ingest", cfg)


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1; yields its endpoint URL. Env vars point boto (and s3fs) at it."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=1).read()
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto server did not start") from None
            time.sleep(0.2)
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield endpoint
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh, empty bucket on the moto server; yields its s3:// URL."""
    import s3fs

    name = "t-" + request.node.name.lower().replace("_", "-")[:40]
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server}, skip_instance_cache=True)
    fs.mkdir(name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def components(tmp_path_factory, ingested):
    """train-clip, train-aesthetic and filter run on a copy of the ingested test data: (config, manifests)."""
    import shutil
    from pathlib import Path

    from flows.registry import run as run_stage

    src, _ = ingested
    workdir = tmp_path_factory.mktemp("components")
    shutil.copytree(Path(src.workdir) / "raw", workdir / "raw")
    cfg = make_config(workdir)
    manifests = {
        "clip": run_stage("train-clip", cfg),
        "aesthetic": run_stage("train-aesthetic", cfg),
        "filter": run_stage("filter", cfg),
    }
    return cfg, manifests


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from a second thread, and two OpenMP threads on a busy 2-core box stall."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
