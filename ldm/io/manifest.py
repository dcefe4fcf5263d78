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


def root_cause(e: BaseException, stop: tuple[type[BaseException], ...] = ()) -> BaseException:
    """The innermost error under wrappers (Ray's RayTaskError `.cause`, `raise ... from`), or the first `stop` kind."""
    seen = set()
    while id(e) not in seen and not isinstance(e, stop):
        seen.add(id(e))
        inner = getattr(e, "cause", None) or e.__cause__
        if not isinstance(inner, BaseException):
            break
        e = inner
    return e


class OutputState(Enum):
    """What a stage finds in its output folder before it starts."""

    FRESH = "fresh"  # nothing there
    RESUME = "resume"  # partial output from the same config
    DONE = "done"  # complete output from the same config: skip
    REPLACE = "replace"  # output from another config, --overwrite: build the new one beside it, swap at commit


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
    return OutputState.REPLACE  # the old output stays until the new one commits (see `swap`)


def staging(out_url: str) -> str:
    """The sibling folder an --overwrite run builds its output in: `<out>.next`."""
    return out_url.rstrip("/") + ".next"


def swap(out_url: str) -> None:
    """Replace out_url by its committed staging folder; a no-op unless the staging folder holds a manifest.

    Idempotent, so a run killed mid-swap is finished by the next run. Locally the move is a rename; on an
    object store a prefix "rename" is a copy of every object then a delete, so the old output is removed
    only once the new manifest is committed in the staging folder, which stays the source until the copy ends.
    """
    staged = staging(out_url)
    if not storage.exists(storage.join(staged, MANIFEST)):
        return
    storage.remove(out_url)
    fs, src = storage.fs_for(staged)
    _, dst = storage.fs_for(out_url)
    if "file" in fs.protocol:
        fs.mv(src, dst, recursive=True)
    else:  # copy the manifest last, so a half-copied output never looks finished
        files = [f for f in fs.find(src) if not f.endswith("/" + MANIFEST)] + [f"{src}/{MANIFEST}"]
        for f in files:
            fs.copy(f, dst + f[len(src) :])
        storage.remove(staged)


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
