"""A stage that does almost nothing, for the protocol's unit tests (tests/ldm/test_manifest.py): fast and real."""

from __future__ import annotations

import os

from ldm.io import storage
from ldm.stage import StageRun


def work(run: StageRun) -> dict:
    """Write one file under the output and return fields that name the output folder; TINY_SKIP fakes a bad shard."""
    run.begin()
    storage.write_bytes_atomic(storage.join(run.out, "data.txt"), str(run.cfg.seed).encode())
    calls = storage.join(run.workdir.url, "calls.txt")  # how many times the work ran, across runs
    before = int(storage.read_json(calls)) if storage.exists(calls) else 0
    storage.write_json_atomic(calls, before + 1)
    skip = os.environ.get("TINY_SKIP")
    return {"written_to": storage.join(run.out, "data.txt"), "resumed": run.resumed, "skipped": [skip] if skip else []}


def summary(m: dict) -> str:
    """One line."""
    return f"tiny summary: {m['written_to']}"
