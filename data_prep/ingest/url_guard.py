"""SSRF guard: which URLs a download may fetch.

`public` (prod) admits only http(s) URLs whose host resolves to public unicast addresses, so a
crafted URL list cannot make the cluster fetch from itself, its private network or a cloud
metadata endpoint. `loopback` (local, test) admits 127.0.0.1 and nothing else.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str], list[str]]

# Instance-metadata services reachable from inside cloud VMs (AWS/GCP/Azure/OpenStack, AWS IPv6,
# Alibaba, Azure's wire server).
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200", "168.63.129.16")
)
METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata", "instance-data"})


def resolve(host: str) -> list[str]:
    """All addresses a host name resolves to (the system resolver)."""
    return sorted({info[4][0] for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)})


def address_verdict(ip: IPAddress) -> str | None:
    """Why an address must not be fetched, or None if it is public unicast."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip in METADATA_ADDRESSES:
        return "cloud_metadata"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link_local"
    if ip.is_private:
        return "private"
    if ip.is_multicast or ip.is_reserved or ip.is_unspecified or not ip.is_global:
        return "reserved"
    return None


def _host(url: str) -> tuple[str | None, str | None]:
    """(host, reason) for a URL: the reason is set when the URL itself is unacceptable."""
    try:
        parts = urlsplit(url.strip())
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        return None, "bad_url"
    if parts.scheme not in ("http", "https"):
        return None, "bad_scheme"
    if not host:
        return None, "bad_url"
    return host, None


class UrlGuard:
    """Checks URLs against a policy; host resolutions are cached and can be done in bulk.

    `pinned(host)` also returns the addresses that were checked, so a connection can be made to exactly
    those (see data_prep/ingest/fetch.py) instead of resolving the name a second time.
    """

    def __init__(self, policy: str, resolver: Resolver = resolve):
        if policy not in ("public", "loopback"):
            raise ValueError(f"unknown url policy {policy!r}")
        self.policy = policy
        self.resolver = resolver
        self._checked: dict[str, tuple[str | None, tuple[str, ...]]] = {}

    def pinned(self, host: str) -> tuple[str | None, tuple[str, ...]]:
        """(why the host must not be fetched or None, the checked addresses a connection may use)."""
        if host in self._checked:
            return self._checked[host]
        # Keep and return this call's own answer: another thread may store a different one meanwhile.
        result = self._checked[host] = self._check_host(host)
        return result

    def host_verdict(self, host: str) -> str | None:
        """Why a host must not be fetched under the policy, or None."""
        return self.pinned(host)[0]

    def _check_host(self, host: str) -> tuple[str | None, tuple[str, ...]]:
        if self.policy == "loopback":
            return (None, ("127.0.0.1",)) if host == "127.0.0.1" else ("not_loopback", ())
        if host.lower().rstrip(".") in METADATA_HOSTS:
            return "cloud_metadata", ()
        try:
            addresses = [ipaddress.ip_address(host)]
        except ValueError:
            try:
                addresses = [ipaddress.ip_address(a.split("%", 1)[0]) for a in self.resolver(host)]
            except (OSError, UnicodeError, ValueError):
                return "unresolvable", ()
            if not addresses:
                return "unresolvable", ()
        for ip in addresses:  # every address must be safe: a host may resolve to several
            verdict = address_verdict(ip)
            if verdict:
                return verdict, ()
        return None, tuple(str(ip) for ip in addresses)

    def prefetch(self, urls: Iterable[str], threads: int = 32) -> None:
        """Resolve the distinct hosts of many URLs in parallel, filling the cache."""
        hosts = {h for h, reason in map(_host, urls) if h and h not in self._checked}
        if self.policy == "loopback" or not hosts:
            return
        with ThreadPoolExecutor(threads) as pool:
            for host, result in zip(hosts, pool.map(self._check_host, hosts), strict=True):
                self._checked[host] = result

    def check(self, url: str) -> str | None:
        """Why a URL must not be fetched, or None when it may be."""
        host, reason = _host(url)
        if reason:
            return reason
        assert host is not None
        return self.host_verdict(host)
