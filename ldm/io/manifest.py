"""Stage manifests: what a stage's output was made from, written last so a half-done output never looks done."""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from enum import Enum
from importlib import metadata
from pathlib import Path
from typing import Any

from ldm.io import storage

MANIFEST = "manifest.json"
INTENT = "_run.json"  # written when a stage starts: which config the partial output belongs to


class StageError(RuntimeError):
    """A stage refused its input or output; the message is one line for the user."""


class OutputState(Enum):
    """What a stage finds in its output folder before it starts."""

    FRESH = "fresh"  # nothing there
    RESUME = "resume"  # partial output from the same config
    DONE = "done"  # complete output from the same config: skip


def code_version() -> str:
    """The package version, plus the git commit when running from a checkout."""
    version = metadata.version("ldm-pipeline")
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        sha = ""
    return f"{version}+{sha}" if sha else version


def digest(obj: Any) -> str:
    """Short stable hash of a JSON-able object."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_output(out_url: str, config_hash: str, overwrite: bool) -> OutputState:
    """Decide whether to skip, resume or start; refuse output made from another config unless overwrite."""
    manifest_url, intent_url = storage.join(out_url, MANIFEST), storage.join(out_url, INTENT)
    found = None
    for url in (manifest_url, intent_url):
        if storage.exists(url):
            found = storage.read_json(url).get("config_hash")
            if found == config_hash:
                return OutputState.DONE if url == manifest_url else OutputState.RESUME
            break
    if found is None and not _has_entries(out_url):
        return OutputState.FRESH
    if not overwrite:
        what = f"config {found}" if found else "unknown config"
        raise StageError(
            f"{out_url} already holds output from a different {what} (this config: {config_hash}); "
            "pass --overwrite to replace it"
        )
    storage.remove(out_url)
    return OutputState.FRESH


def _has_entries(url: str) -> bool:
    fs, path = storage.fs_for(url)
    return fs.exists(path) and bool(fs.ls(path))


def begin(out_url: str, stage: str, config_hash: str) -> None:
    """Record which config the output folder now belongs to (before any output is written)."""
    storage.write_json_atomic(
        storage.join(out_url, INTENT), {"stage": stage, "config_hash": config_hash, "started": time.time()}
    )


def commit(out_url: str, stage: str, config_hash: str, config: dict, **fields: Any) -> dict:
    """Write the stage manifest, the last step of a successful stage; return it."""
    manifest = {
        "stage": stage,
        "config_hash": config_hash,
        "config": config,
        "code_version": code_version(),
        "finished": time.time(),
        **fields,
    }
    storage.write_json_atomic(storage.join(out_url, MANIFEST), manifest)
    storage.remove(storage.join(out_url, INTENT))
    return manifest
