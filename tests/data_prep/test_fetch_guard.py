"""Redirects and DNS rebinding, end to end: the real ingest stage (img2dataset's downloader in Ray tasks)
against a hostile world served inside a network namespace by tests/data_prep/ssrf_world.py.

The namespace (`unshare -n -m`) has loopback only; the "public" and forbidden addresses are added to
its loopback, and its /etc/resolv.conf (bind-mounted, this mount namespace only) names a DNS server
the world runs on 127.0.0.1:53. A real resolver is the robust choice: the downloads run in Ray's
worker processes, which resolve through glibc's getaddrinfo, which no in-process hook reaches.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from ldm.io import storage
from tests.data_prep import ssrf_world as world

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare (network and mount namespace)"
)


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
    """One ingest run in the hostile world: (result.json, the manifest's counts)."""
    out = tmp_path_factory.mktemp("ssrf")
    resolv = out / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\noptions attempts:2 timeout:2\n")
    setup = ["ip link set lo up"]
    setup += [f"ip addr add {a}/32 dev lo" for a in world.ADDRESSES]
    setup += [f"mount --bind {resolv} /etc/resolv.conf"]
    script = " && ".join(setup) + f" && exec {sys.executable} -m tests.data_prep.ssrf_world {out}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        ["unshare", "-n", "-m", "bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((out / "result.json").read_text())
    assert result["returncode"] == 0, result["stderr"]
    counts = storage.read_json(str(out / "w" / "raw" / "manifest.json"))["counts"]
    return result, counts


# Ray itself, not the URL list: starting a local Ray instance (ingest runs on one) makes its dashboard ask the cloud
# metadata services which cloud it is on, even with usage stats off (ray/dashboard/modules/usage_stats/
# usage_stats_head.py -> usage_lib.get_cloud_from_metadata_requests), with python-requests' User-Agent. Those
# fixed probes are set apart; a download (img2dataset's Mozilla User-Agent) is never one of them.
RAY_PROBES = {"/metadata/instance?api-version=2021-12-13", "/latest/meta-data/", "/computeMetadata/v1"}


def _ray_probe(hit: dict) -> bool:
    return hit["path"] in RAY_PROBES and hit.get("agent", "").startswith("python-requests/")


def _hits(result: dict, server: str) -> list[dict]:
    return [h for h in result["hits"] if h["server"] == server and not _ray_probe(h)]


def test_a_redirect_to_a_forbidden_address_is_refused_and_counted(hostile_run):
    """Bug caught: urllib follows a public URL's 302 to the metadata service or a private address.

    Every hop must pass the URL policy: the forbidden servers see no request at all, the refusals are
    counted as `blocked_redirect`, and a redirect to an allowed address is still followed.
    """
    result, counts = hostile_run
    assert _hits(result, world.METADATA) == []
    assert [h for h in _hits(result, world.PRIVATE) if h["path"] == "/secret.jpg"] == []
    expected = Counter(world.REDIRECT_URLS.values())
    assert counts.get("blocked_redirect", 0) == expected["blocked_redirect"]
    assert {h["path"] for h in _hits(result, world.PUBLIC)} >= set(world.REDIRECTS) | {"/img.jpg"}


def test_a_name_is_connected_to_at_the_address_that_was_checked(hostile_run):
    """Bug caught: the guard resolves a name, then the downloader resolves it again and connects to
    whatever the second answer says (DNS rebinding to a private address).

    `rebind.example` turns private after the driver's check: the download must not reach the private
    server. `pinned.example` turns private only after two lookups (the driver's check and the worker's
    pinned check): a downloader that checks and then resolves once more would reach it; a pinned one
    fetches from the public address it checked, with the name still in the Host header.
    """
    result, counts = hostile_run
    assert _hits(result, world.PRIVATE) == []
    pinned = [h for h in _hits(result, world.PUBLIC) if h["host"] == "pinned.example"]
    assert pinned, result["hits"]
    assert counts.get("blocked_rebind", 0) == 1
    assert counts.get("success", 0) == Counter({**world.REDIRECT_URLS, **world.REBIND_URLS}.values())["success"]
