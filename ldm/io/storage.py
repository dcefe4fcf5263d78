"""fsspec helpers: every stage reads and writes through URLs (`file://`, `s3://`), never bare disk."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from typing import Any

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem


def normalize(url: str) -> str:
    """A URL with a scheme; bare paths become absolute `file://` URLs."""
    if "://" in url:
        return url.rstrip("/")
    return "file://" + os.path.abspath(os.path.expanduser(url))


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL with '/'."""
    return "/".join([url.rstrip("/"), *(p.strip("/") for p in parts)])


def fs_for(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and the protocol-less path for a URL, with no stale cached listing of it.

    Object-store filesystems cache directory listings per instance; other processes (img2dataset's
    workers, a killed run) write behind our back, so every lookup starts from the store itself.
    """
    fs, path = url_to_fs(url)
    if not isinstance(fs, LocalFileSystem):
        fs.invalidate_cache(path)
    return fs, path


def exists(url: str) -> bool:
    """Whether a file or folder exists at the URL."""
    fs, path = fs_for(url)
    return fs.exists(path)


def listdir(url: str, pattern: str = "*") -> list[str]:
    """Sorted URLs of the entries under a folder that match a glob pattern."""
    fs, path = fs_for(url)
    proto = url.split("://", 1)[0] if "://" in url else "file"
    return sorted(f"{proto}://{p}" if proto != "file" else "file://" + p for p in fs.glob(f"{path}/{pattern}"))


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write a file so readers see the old content or the new, never a half-written one.

    Local files go to a temporary name then rename; an object store's PUT is already atomic.
    """
    fs, path = fs_for(url)
    parent = path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    if isinstance(fs, LocalFileSystem):
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with fs.open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    else:
        with fs.open(path, "wb") as f:
            f.write(data)


def write_json_atomic(url: str, obj: Any) -> None:
    """Write JSON atomically (see write_bytes_atomic)."""
    write_bytes_atomic(url, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(url: str) -> Any:
    """Read a JSON file from a URL."""
    fs, path = fs_for(url)
    with fs.open(path, "rb") as f:
        return json.load(f)


def remove(url: str) -> None:
    """Remove a file or folder tree if it exists."""
    fs, path = fs_for(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a local file, streamed in 1 MiB chunks (an SD VAE's weights are ~330 MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
