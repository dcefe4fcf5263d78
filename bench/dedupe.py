"""Ingest dedupe: memory and speed of the on-disk SQLite digest set against an in-memory Python set.

Each side runs in a fresh child process (so peak RSS is its own), alternating, on the same URL list
(with 1% duplicates) fed in files of 100,000 rows as ingest does. Prints peak RSS growth over an
empty interpreter, URLs/s, and the ratios.

    .venv/bin/python bench/dedupe.py --urls 1000000 4000000 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CHILD = r"""
import hashlib, json, resource, sys, tempfile, time, os
n, side = int(sys.argv[1]), sys.argv[2]
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
FILE = 100_000
def urls(start):
    return [f"https://images.example.com/{i % (n - n // 100)}/img.jpg" for i in range(start, min(n, start + FILE))]
t0 = time.perf_counter()
dups = 0
if side == "set":
    seen = set()
    for start in range(0, n, FILE):
        for u in urls(start):
            h = hashlib.blake2b(u.encode(), digest_size=8).digest()
            dups += h in seen
            seen.add(h)
else:
    from data_prep.ingest.dedupe import SeenUrls
    with tempfile.TemporaryDirectory() as tmp:
        seen = SeenUrls(os.path.join(tmp, "s.sqlite"))
        for start in range(0, n, FILE):
            dups += int((~seen.first_seen(urls(start))).sum())
        disk = os.path.getsize(os.path.join(tmp, "s.sqlite"))
        seen.close()
secs = time.perf_counter() - t0
grow = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
print(json.dumps({"secs": secs, "rss_mb": grow, "dups": dups, "disk_mb": disk / 2**20 if side == "sqlite" else 0}))
"""


def run(n: int, side: str) -> dict:
    """One child process deduping n URLs with the given side; its figures."""
    out = subprocess.run([sys.executable, "-c", CHILD, str(n), side], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main() -> None:
    """Run both sides at each size, alternating, and print medians and ratios."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--urls", type=int, nargs="+", default=[1_000_000, 4_000_000])
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    for n in a.urls:
        res: dict[str, list[dict]] = {"set": [], "sqlite": []}
        for _ in range(a.repeats):
            for side in res:
                res[side].append(run(n, side))
        assert len({r["dups"] for rs in res.values() for r in rs}) == 1, "both sides must find the same duplicates"
        med = {
            s: {k: statistics.median(r[k] for r in rs) for k in ("secs", "rss_mb", "disk_mb")} for s, rs in res.items()
        }
        print(
            f"{n:>10,} URLs: python set {med['set']['rss_mb']:7.1f} MB, {n / med['set']['secs']:9,.0f} URLs/s | "
            f"sqlite set {med['sqlite']['rss_mb']:7.1f} MB (+{med['sqlite']['disk_mb']:.0f} MB disk), "
            f"{n / med['sqlite']['secs']:9,.0f} URLs/s | "
            f"memory ratio {med['sqlite']['rss_mb'] / med['set']['rss_mb']:.3f}, "
            f"speed ratio {med['set']['secs'] / med['sqlite']['secs']:.2f}"
        )


if __name__ == "__main__":
    main()
