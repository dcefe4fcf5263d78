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
        if url.startswith(("s3://", "s3a://")):
            _check_bucket(fs, path.split("/", 1)[0])
    return fs, path


class StorageError(RuntimeError):
    """An object store that cannot be used as configured (no bucket, no credentials, no endpoint): one line."""


_buckets_seen: set[tuple[str, str]] = set()


def _check_bucket(fs: fsspec.AbstractFileSystem, bucket: str) -> None:
    """Once per process and bucket: a missing bucket, absent credentials or a dead endpoint as one StorageError.

    Otherwise a missing bucket reads as "no manifest yet" and fails only at the first write, deep in s3fs.
    """
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or (getattr(fs, "client_kwargs", None) or {}).get("endpoint_url")
    key = (str(endpoint), bucket)
    if key in _buckets_seen:
        return
    where = f"s3://{bucket}" + (f" at {endpoint}" if endpoint else "")
    try:
        fs.info(bucket)
    except FileNotFoundError:
        raise StorageError(f"{where}: the bucket does not exist; create it or fix the s3:// URL") from None
    except PermissionError:
        pass  # credentials that may read keys but not the bucket itself: let the real request decide
    except Exception as e:  # botocore's errors, without importing botocore for local runs
        name = type(e).__name__
        if name in ("NoCredentialsError", "PartialCredentialsError"):
            raise StorageError(
                f"{where}: no S3 credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
            ) from e
        if name in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError"):
            raise StorageError(f"{where}: cannot reach the S3 endpoint; check AWS_ENDPOINT_URL") from e
        raise
    _buckets_seen.add(key)


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


def download_folder(url: str, local_dir: str) -> None:
    """Copy every file under a folder URL into a local folder, keeping relative paths.

    (fsspec's recursive `get` into an existing folder nests the source folder inside it.)
    """
    fs, path = fs_for(url)
    root = path.rstrip("/")
    for f in fs.find(root):
        dest = os.path.join(local_dir, f[len(root) :].lstrip("/"))
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        fs.get(f, dest)
