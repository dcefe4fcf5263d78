"""Downloads that obey the URL policy on every hop and connect only to the addresses that were checked.

img2dataset's `Downloader` fetches each image with `urllib.request.urlopen`, here inside the Ray task that
downloads a shard (data_prep/ingest/cluster.py), on whichever node runs it. Two holes follow from that if
nothing is changed:

- redirects: urllib follows a 30x to any host, so a public URL answering `302 Location:
  http://169.254.169.254/...` would make the worker fetch the metadata service;
- DNS rebinding: the guard resolves a name while the list is prepared, urllib resolves it again when it connects,
  and a name whose answer changes in between (short TTL, attacker's DNS) reaches a private address.

The fix works inside the worker, where the requests are made:

- `GuardedDownloader` is img2dataset's `Downloader` plus the URL policy; it is pickled into each
  Ray task (so this module is imported in the worker) and its `download` installs, before the shard
  is downloaded, a process-wide urllib opener (`urllib.request.install_opener`, the documented hook
  `urlopen` uses) with a fresh guard: each shard resolves its hosts anew, so a long-lived worker
  never connects on an answer cached for hours;
- the opener's HTTP(S) connections never resolve a name themselves: `UrlGuard.pinned` resolves it,
  checks every address against the policy and hands back exactly those addresses, and the socket is
  connected to one of them. The request keeps the original host name, so the Host header, TLS SNI
  and certificate check are those of the URL; only the TCP destination is pinned;
- the opener's redirect handler checks each redirect target with the same guard and refuses a
  forbidden one (counted as `blocked_redirect`); an allowed target is fetched through the same
  pinned connections. A refusal at connect time (the worker's answer for a name fails the policy
  although the preparation's passed) is counted as `blocked_rebind`;
- the opener has no proxy, FTP, file or data handlers: a proxy would resolve names itself (and
  environment proxy settings are ignored on purpose), the others are schemes the policy refuses.
"""

from __future__ import annotations

import functools
import http.client
import socket
import ssl
import urllib.error
import urllib.request
from typing import Any

from img2dataset.downloader import Downloader
from img2dataset.resizer import Resizer
from img2dataset.writer import WebDatasetSampleWriter

from data_prep.ingest.outcomes import OOM_SHARD_COUNT
from data_prep.ingest.url_guard import UrlGuard
from ldm.config import IngestConfig

# Prefixes of the error messages below; data_prep/ingest/outcomes.py sorts them into outcomes.
REFUSED = "url guard:"


class GuardRefused(OSError):
    """A connection or redirect the URL policy does not allow."""


def _pinned_connect(guard: UrlGuard, address: tuple[str, int], timeout: Any, source_address: Any = None):
    """Connect to one of the addresses the guard checked for this host, never to a fresh resolution."""
    host, port = address
    verdict, addresses = guard.pinned(host)
    if verdict:
        raise GuardRefused(f"{REFUSED} {verdict} at connect")
    error: OSError | None = None
    for ip in addresses:
        try:
            return socket.create_connection((ip, port), timeout, source_address)
        except OSError as e:
            error = e
    assert error is not None
    raise error


class _PinnedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, *args: Any, guard: UrlGuard, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._create_connection = functools.partial(_pinned_connect, guard)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    # HTTPSConnection.connect calls the same _create_connection, then wraps the socket with
    # server_hostname=self.host: the URL's host name, so SNI and the certificate check are unchanged.
    def __init__(self, *args: Any, guard: UrlGuard, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._create_connection = functools.partial(_pinned_connect, guard)


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, guard: UrlGuard):
        super().__init__()
        self.guard = guard

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(functools.partial(_PinnedHTTPConnection, guard=self.guard), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, guard: UrlGuard):
        super().__init__(context=ssl.create_default_context())
        self.guard = guard

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(functools.partial(_PinnedHTTPSConnection, guard=self.guard), req, context=self._context)


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    def __init__(self, guard: UrlGuard):
        super().__init__()
        self.guard = guard

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001 - urllib's signature
        verdict = self.guard.check(newurl)
        if verdict:
            fp.close()
            # URLError, not HTTPError: the outcome is the refusal, not the 30x status.
            raise urllib.error.URLError(f"{REFUSED} redirect refused ({verdict})")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def guarded_opener(guard: UrlGuard) -> urllib.request.OpenerDirector:
    """A urllib opener for http(s) only, whose connections and redirects all pass the guard."""
    opener = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.UnknownHandler(),
        _HTTPHandler(guard),
        _HTTPSHandler(guard),
        urllib.request.HTTPDefaultErrorHandler(),
        _RedirectHandler(guard),
        urllib.request.HTTPErrorProcessor(),
    ):
        opener.add_handler(handler)
    return opener


def install(policy: str) -> None:
    """Make every `urlopen` in this process go through a guarded opener for the policy, with a fresh guard."""
    urllib.request.install_opener(guarded_opener(UrlGuard(policy)))


class GuardedDownloader(Downloader):
    """img2dataset's Downloader that installs the guarded opener in the worker before each shard."""

    def __init__(self, *args: Any, url_policy: str, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.url_policy = url_policy

    def download(self, row: tuple[int, str]) -> None:
        """Download one shard (id, Arrow file URL) with the guard installed; raise what stops the shard."""
        install(self.url_policy)
        self.download_shard(row)  # not __call__, which prints an error and returns False: a task must fail


def make_downloader(ic: IngestConfig, extras: list[str]) -> GuardedDownloader:
    """The downloader for the config, built as img2dataset's download() builds it for these arguments.

    Its output_folder is set per attempt by the task that runs it.
    """
    resizer = Resizer(
        image_size=ic.resolution, resize_mode=ic.resize_mode, resize_only_if_bigger=False,
        encode_quality=ic.encode_quality, encode_format="jpg", max_image_area=ic.max_image_area,
    )  # fmt: skip
    return GuardedDownloader(
        sample_writer_class=WebDatasetSampleWriter, resizer=resizer, thread_count=ic.threads, save_caption=True,
        extract_exif=False, output_folder="", column_list=[*extras, "caption", "url"], timeout=ic.timeout_s,
        number_sample_per_shard=ic.samples_per_shard, oom_shard_count=OOM_SHARD_COUNT, compute_hash="sha256",
        verify_hash_type=None, encode_format="jpg", retries=ic.retries, user_agent_token=None,
        disallowed_header_directives=["noai", "noimageai"], url_policy=ic.url_policy,
    )  # fmt: skip
