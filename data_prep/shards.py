"""Read webdataset tar shards sample by sample through fsspec (local or s3)."""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from typing import Any

from data_prep import storage


def iter_samples(tar_url: str) -> Iterator[dict[str, Any]]:
    """Yield one dict per sample of a webdataset tar: `key` plus one entry per file extension.

    `.json` members are parsed and `.txt` decoded; other members (images) stay bytes.
    """
    fs, path = storage.fs_for(tar_url)
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        current: dict[str, Any] = {}
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.rpartition("/")[2].partition(".")
            if current and current["key"] != key:
                yield current
                current = {}
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
            current["key"] = key
            if ext == "json":
                current[ext] = json.loads(data)
            elif ext == "txt":
                current[ext] = data.decode("utf-8")
            else:
                current[ext] = data
        if current:
            yield current
