"""Read img2dataset's per-shard stats and sort its error messages into outcome kinds."""

from __future__ import annotations

import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from ldm.io import storage

OOM_SHARD_COUNT = 5  # digits of a shard's name, as img2dataset is told: 00000.tar

# (substring of img2dataset's error message, outcome); first match wins, checked in lower case.
PATTERNS: tuple[tuple[str, str], ...] = (
    # Refusals by the guarded opener (data_prep/ingest/fetch.py): before "http error" and "timeout".
    ("url guard: redirect", "blocked_redirect"),
    ("redirection to url", "blocked_redirect"),  # urllib's own refusal of a redirect to file:// and the like
    ("url guard: unresolvable", "dns_error"),
    ("url guard:", "blocked_rebind"),  # the download's answer for a name failed the policy the preparation's passed
    ("http error", "http_error"),
    ("timed out", "timeout"),
    ("timeout", "timeout"),
    ("name or service not known", "dns_error"),
    ("temporary failure in name resolution", "dns_error"),
    ("nodename nor servname", "dns_error"),
    ("connection refused", "connection_error"),
    ("connection reset", "connection_error"),
    ("network is unreachable", "connection_error"),
    ("remote end closed", "connection_error"),
    ("x-robots-tag", "opted_out"),
    ("hash mismatch", "hash_mismatch"),
    ("image too small", "size_filtered"),
    ("area too large", "size_filtered"),
    ("aspect ratio", "size_filtered"),
    ("decod", "decode_error"),
    ("imdecode", "decode_error"),
    ("pixels", "decode_error"),  # OpenCV refusing a declared size over its pixel limit
    ("!buf.empty()", "decode_error"),
)


def classify(message: str) -> str:
    """Outcome kind of one img2dataset status message."""
    if message == "success":
        return "success"
    low = message.lower()
    for needle, outcome in PATTERNS:
        if needle in low:
            return outcome
    return "other_error"


def read_shard_stats(shards_url: str, ids: list[int], threads: int = 32) -> dict[int, dict]:
    """The stats of the shards with these ids, by id, read in parallel (`<shard>_stats.json`, written last)."""
    fs, path = storage.fs_for(shards_url)

    def read(shard: int) -> dict:
        with fs.open(f"{path}/{shard:0{OOM_SHARD_COUNT}d}_stats.json", "r") as f:
            return json.load(f)

    with ThreadPoolExecutor(threads) as pool:
        return dict(zip(ids, pool.map(read, ids), strict=True))


def tally(stats: dict[str, dict]) -> tuple[Counter, Counter]:
    """(outcome counts, raw message counts) summed over shards."""
    outcomes: Counter = Counter()
    messages: Counter = Counter()
    for s in stats.values():
        for message, n in s["status_dict"].items():
            outcomes[classify(message)] += n
            messages[message] += n
    return outcomes, messages
