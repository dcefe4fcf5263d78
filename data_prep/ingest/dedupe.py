"""Exact duplicate-URL detection over a whole URL list in bounded memory.

A Python set of URL digests costs ~90 bytes per URL: over 100 GB at relaion2B's 2 billion rows. Here
the digests (8 bytes of blake2b, so a false "duplicate" needs a 64-bit collision: ~0.1 expected
among 2 billion URLs) live in an on-disk SQLite set with a fixed page cache, so the driver's memory
stays flat however long the list; disk use is ~20 bytes per unique URL.

On a cluster the set is split by digest into partitions (`partition`), each deduplicated by one task over the
files in order (`first_across`), so the first occurrence in list order wins as it would in one pass.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Sequence

import numpy as np

CACHE_MB = 64  # SQLite page cache: the memory bound
MAX_VARS = 30_000  # parameters per SELECT ... IN (...): under SQLite's default limit of 32,766


def digest(url: str) -> int:
    """A URL's 8-byte blake2b digest as a signed 64-bit integer (SQLite's INTEGER)."""
    return int.from_bytes(hashlib.blake2b(url.encode(), digest_size=8).digest(), "little", signed=True)


def digests(urls: Sequence[str]) -> np.ndarray:
    """int64 [len(urls)]: each URL's digest."""
    return np.fromiter((digest(u) for u in urls), dtype=np.int64, count=len(urls))


def partition(hashes: np.ndarray, partitions: int) -> list[np.ndarray]:
    """Split one file's digests by digest: for each partition, int64 [2, k] of (digest, position in the file)."""
    positions = np.arange(len(hashes), dtype=np.int64)
    which = hashes % partitions  # numpy's modulo is non-negative for a positive divisor
    return [np.stack([hashes[which == p], positions[which == p]]) for p in range(partitions)]


def first_across(parts: Sequence[np.ndarray], path: str) -> list[np.ndarray]:
    """One partition's (digest, position) arrays, one per file in list order -> each file's duplicate positions.

    A URL's first occurrence (earliest file, then earliest position) is kept; later ones are duplicates.
    """
    seen = SeenUrls(path)
    try:
        return [p[1][~seen.first_seen_digests(p[0])] for p in parts]
    finally:
        seen.close()


class SeenUrls:
    """The set of URLs met so far, on disk; `first_seen` marks each URL of a batch new or duplicate."""

    def __init__(self, path: str):
        self.db = sqlite3.connect(path)
        # A scratch set rebuilt by every run: no journal, no fsync.
        self.db.execute("PRAGMA journal_mode=OFF")
        self.db.execute("PRAGMA synchronous=OFF")
        self.db.execute(f"PRAGMA cache_size=-{CACHE_MB * 1024}")
        self.db.execute("CREATE TABLE IF NOT EXISTS seen (h INTEGER PRIMARY KEY) WITHOUT ROWID")

    def first_seen(self, urls: Sequence[str]) -> np.ndarray:
        """bool [len(urls)]: True where a URL appears for the first time (in this batch or any before)."""
        return self.first_seen_digests(digests(urls))

    def first_seen_digests(self, hashes: np.ndarray) -> np.ndarray:
        """bool [len(hashes)]: True where a digest appears for the first time (in this batch or any before)."""
        unique, first = np.unique(hashes, return_index=True)  # within the batch, the first occurrence wins
        known: set[int] = set()
        for i in range(0, len(unique), MAX_VARS):
            chunk = unique[i : i + MAX_VARS].tolist()
            marks = ",".join("?" * len(chunk))
            known.update(h for (h,) in self.db.execute(f"SELECT h FROM seen WHERE h IN ({marks})", chunk))
        new = np.fromiter((h not in known for h in unique.tolist()), dtype=bool, count=len(unique))
        self.db.executemany("INSERT INTO seen VALUES (?)", ((h,) for h in unique[new].tolist()))
        self.db.commit()
        out = np.zeros(len(hashes), dtype=bool)
        out[first[new]] = True
        return out

    def close(self) -> None:
        """Close the database (the caller removes its file)."""
        self.db.close()
