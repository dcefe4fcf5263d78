"""A stage that does almost nothing, for the protocol's unit tests (tests/ldm/test_manifest.py): fast and real."""

from __future__ import annotations

import logging
import os

from ldm.io import storage
from ldm.stage import StageRun


def work(run: StageRun) -> dict:
    """Write one file under the output and return what the protocol handed the work; TINY_SKIP fakes a bad shard."""
    run.begin()
    storage.write_bytes_atomic(storage.join(run.out, "data.txt"), str(run.cfg.seed).encode())
    calls = storage.join(run.workdir.url, "calls.txt")  # how many times the work ran, across runs
    before = int(storage.read_json(calls)) if storage.exists(calls) else 0
    storage.write_json_atomic(calls, before + 1)
    storage.write_bytes_atomic(storage.join(run.workdir.output(run.stage.name), "marker.txt"), b"")
    logging.getLogger("fsspec").warning("tiny: library chatter")  # goes to the stage's log file
    skip = os.environ.get("TINY_SKIP")
    return {
        "written_to": storage.join(run.out, "data.txt"),
        "output_seen": run.workdir.output(run.stage.name),
        "resumed": run.resumed,
        "config_seen": run.config,
        "inputs_seen": sorted(run.inputs),
        "skipped": [skip] if skip else [],
    }


def sources(cfg) -> dict[str, str]:  # noqa: ANN001 - a PipelineConfig
    """The content of a file named by the config, as a source file outside the work directory would be."""
    path = os.path.join(str(cfg.workdir), "..", "source.txt")
    return {path: open(path).read() if os.path.exists(path) else ""}


def summary(m: dict) -> str:
    """One line."""
    return f"tiny summary: {m['written_to']}"
