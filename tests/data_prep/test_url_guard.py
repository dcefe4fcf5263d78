"""The SSRF guard, on the guard function with IP literals, and end to end inside a network namespace."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep.ingest.url_guard import UrlGuard
from ldm.io import storage


def _no_dns(host: str) -> list[str]:
    raise AssertionError(f"the guard tried to resolve {host!r}; literals need no lookup")


@pytest.mark.parametrize(
    ("url", "verdict"),
    [
        ("http://127.0.0.1/a.jpg", "loopback"),
        ("http://127.8.9.10:8080/a.jpg", "loopback"),
        ("http://[::1]/a.jpg", "loopback"),
        ("http://[::ffff:127.0.0.1]/a.jpg", "loopback"),  # IPv4-mapped IPv6
        ("http://10.1.2.3/a.jpg", "private"),
        ("http://172.16.5.4/a.jpg", "private"),
        ("http://192.168.0.10/a.jpg", "private"),
        ("http://[fc00::1]/a.jpg", "private"),
        ("http://169.254.169.254/latest/meta-data/", "cloud_metadata"),
        ("http://[fd00:ec2::254]/latest/meta-data/", "cloud_metadata"),
        ("http://100.100.100.200/latest/meta-data/", "cloud_metadata"),
        ("http://metadata.google.internal/computeMetadata/v1/", "cloud_metadata"),
        ("http://169.254.1.1/a.jpg", "link_local"),
        ("http://[fe80::1]/a.jpg", "link_local"),
        ("http://0.0.0.0/a.jpg", "private"),
        ("http://224.0.0.1/a.jpg", "reserved"),
        ("http://100.64.0.1/a.jpg", "reserved"),  # carrier-grade NAT: not public
        ("ftp://93.184.216.34/a.jpg", "bad_scheme"),
        ("file:///etc/passwd", "bad_scheme"),
        ("gopher://93.184.216.34/", "bad_scheme"),
        ("http://93.184.216.34:notaport/a.jpg", "bad_url"),
        ("http:///a.jpg", "bad_url"),
        ("http://93.184.216.34/a.jpg", None),
        ("https://8.8.8.8/a.jpg", None),
        ("https://[2606:4700::1111]/a.jpg", None),
        ("http://[4000::1]/a.jpg", "reserved"),  # IANA-reserved, yet Python calls it global: reserved must win
    ],
)
def test_public_policy_on_ip_literals(url, verdict):
    assert UrlGuard("public", resolver=_no_dns).check(url) == verdict


def test_public_policy_checks_every_address_a_name_resolves_to():
    answers = {"cdn.example": ["93.184.216.34"], "rebind.example": ["93.184.216.34", "10.0.0.7"]}
    calls = []

    def resolver(host):
        calls.append(host)
        if host not in answers:
            raise OSError("no such host")
        return answers[host]

    guard = UrlGuard("public", resolver=resolver)
    assert guard.check("http://cdn.example/a.jpg") is None
    assert guard.check("http://rebind.example/a.jpg") == "private"
    assert guard.check("http://gone.example/a.jpg") == "unresolvable"
    assert guard.check("http://cdn.example/b.jpg") is None
    assert calls.count("cdn.example") == 1  # cached per host


@pytest.mark.parametrize(
    ("url", "verdict"),
    [
        ("http://127.0.0.1:5000/img/1.jpg", None),
        ("http://127.0.0.2/img/1.jpg", "not_loopback"),
        ("http://localhost/img/1.jpg", "not_loopback"),
        ("http://10.0.0.1/img/1.jpg", "not_loopback"),
        ("http://93.184.216.34/img/1.jpg", "not_loopback"),
        ("ftp://127.0.0.1/img/1.jpg", "bad_scheme"),
    ],
)
def test_loopback_policy_allows_127_0_0_1_and_nothing_else(url, verdict):
    assert UrlGuard("loopback", resolver=_no_dns).check(url) == verdict


def test_pinned_hands_back_exactly_the_checked_addresses():
    """Bugs caught: the pinned list not being the addresses that were checked (the connection would then go
    somewhere unchecked); an IPv6 zone id (`fe80::1%eth0`, as getaddrinfo reports link-local answers) making a
    link-local answer "unresolvable" or, split at the wrong `%`, unparsable; an unknown policy accepted."""
    answers = {"cdn.example": ["93.184.216.34", "2606:4700::1111"], "zoned.example": ["fe80::1%eth0"],
               "twozones.example": ["fe80::1%a%b"], "empty.example": []}  # fmt: skip
    guard = UrlGuard("public", resolver=lambda h: answers[h])
    assert guard.pinned("cdn.example") == (None, ("93.184.216.34", "2606:4700::1111"))
    assert guard.pinned("zoned.example") == ("link_local", ())
    assert guard.check("http://twozones.example/") == "link_local"
    assert guard.check("http://empty.example/") == "unresolvable"
    assert UrlGuard("loopback").pinned("127.0.0.1") == (None, ("127.0.0.1",))
    with pytest.raises(ValueError, match="unknown url policy 'open'"):
        UrlGuard("open")


@pytest.mark.parametrize("host", ["metadata.google.internal.", "METADATA.google.internal", "instance-data"])
def test_metadata_names_are_refused_whatever_they_resolve_to(host):
    """Bug caught: a metadata host name written with a trailing dot (a valid FQDN) or in capitals slipping past
    the name check, then resolving (through a hostile or split-horizon DNS) to an address that looks public."""
    assert UrlGuard("public", resolver=lambda h: ["93.184.216.34"]).check(f"http://{host}/x") == "cloud_metadata"


def test_resolve_uses_the_system_resolver():
    """Bug caught: the resolver returning ports or socket tuples instead of addresses (every name then
    "unresolvable"). `localhost` is answered from /etc/hosts: no network."""
    from data_prep.ingest.url_guard import resolve

    got = resolve("localhost")
    assert "127.0.0.1" in got and got == sorted(set(got))
    assert UrlGuard("public").check("http://localhost/a.jpg") == "loopback"


def test_prefetch_resolves_each_new_host_once_and_fills_the_cache():
    """Bugs caught: prefetch resolving nothing (each download then resolves on its own, serially), resolving
    cached hosts again, storing answers under the wrong host, or resolving under the loopback policy."""
    calls = []

    def resolver(host):
        calls.append(host)
        return {"a.example": ["93.184.216.34"], "b.example": ["10.0.0.1"]}[host]

    guard = UrlGuard("public", resolver=resolver)
    guard.check("http://a.example/0.jpg")
    urls = ["http://a.example/1.jpg", "http://b.example/2.jpg", "http://b.example/3.jpg", "ftp://c.example/x"]
    guard.prefetch(urls, threads=2)
    assert sorted(calls) == ["a.example", "b.example"]
    assert guard.pinned("b.example") == ("private", ()) and guard.pinned("a.example") == (None, ("93.184.216.34",))
    assert sorted(calls) == ["a.example", "b.example"]  # answered from the cache
    loopback = UrlGuard("loopback", resolver=_no_dns)
    loopback.prefetch(["http://a.example/1.jpg"])
    assert loopback._checked == {}  # loopback never looks a name up: no pool of resolver threads either
    assert loopback.check("http://a.example/1.jpg") == "not_loopback"


NAMESPACE_URLS = {
    "http://127.0.0.1:8080/a.jpg": "blocked_loopback",
    "http://[::1]/a.jpg": "blocked_loopback",
    "http://2130706433/a.jpg": "blocked_loopback",  # 127.0.0.1 written as one number
    "http://localhost/a.jpg": "blocked_loopback",
    "http://10.1.2.3/a.jpg": "blocked_private",
    "http://192.168.0.10/a.jpg": "blocked_private",
    "http://169.254.169.254/latest/meta-data/": "blocked_cloud_metadata",
    "http://metadata.google.internal/computeMetadata/v1/": "blocked_cloud_metadata",
    "http://[fe80::1]/a.jpg": "blocked_link_local",
    "ftp://93.184.216.34/a.jpg": "bad_scheme",
    "file:///etc/passwd": "bad_scheme",
    "http://images.invalid/a.jpg": "blocked_unresolvable",
    "http://93.184.216.34/a.jpg": "connection_error",  # public: allowed, then unreachable in the namespace
}


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare")
def test_prod_policy_end_to_end_in_a_network_namespace(tmp_path):
    """The whole ingest stage with the public policy, in a namespace that only has loopback."""
    src = tmp_path / "urls.parquet"
    pq.write_table(
        pa.table({"URL": list(NAMESPACE_URLS), "TEXT": [f"row {i}" for i in range(len(NAMESPACE_URLS))]}), src
    )
    workdir = tmp_path / "w"
    cli = [
        sys.executable,
        "-m",
        "flows.cli",
        "stage",
        "ingest",
        "--profile",
        "test",
        "--workdir",
        str(workdir),
        "--set",
        "source.kind=parquet",
        "--set",
        f"source.paths=[{src}]",
        "--set",
        "ingest.url_policy=public",
    ]
    script = "ip link set lo up && exec " + " ".join(f"'{a}'" for a in cli)
    done = subprocess.run(["unshare", "-n", "bash", "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    counts = storage.read_json(str(workdir / "raw" / "manifest.json"))["counts"]
    expected: dict[str, int] = {}
    for outcome in NAMESPACE_URLS.values():
        expected[outcome] = expected.get(outcome, 0) + 1
    assert counts == expected
