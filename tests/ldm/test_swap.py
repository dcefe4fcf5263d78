"""--overwrite's swap of a committed `<out>.next` over the old output, on the moto S3 server and locally.

On an object store a prefix has no rename: swap copies every object, manifest last, then deletes the
staging prefix, so these tests read the result back through s3fs as a later stage would.
"""

from __future__ import annotations

import pytest

from ldm.io import manifest, storage


def _fill(url: str, files: dict[str, str]) -> None:
    for name, text in files.items():
        storage.write_bytes_atomic(storage.join(url, name), text.encode())


def _listing(url: str) -> dict[str, str]:
    fs, path = storage.fs_for(url)
    if not fs.exists(path):
        return {}
    return {f[len(path) + 1 :]: fs.cat_file(f).decode() for f in fs.find(path)}


@pytest.fixture(params=["local", "s3"])
def out(request, tmp_path):
    if request.param == "local":
        return storage.normalize(str(tmp_path / "filtered"))
    return request.getfixturevalue("s3_bucket") + "/w/filtered"


def test_swap_replaces_the_old_output_with_every_staged_object(out):
    """Bugs caught: a copy that skips nested objects (ls instead of find), the old output's files
    surviving beside the new ones, the staging prefix left behind, or the manifest not copied."""
    _fill(out, {manifest.MANIFEST: "old", "shards/000.tar": "old0", "shards/001.tar": "old1"})
    new = {manifest.MANIFEST: "new", "shards/000.tar": "new0", "scores/000.parquet": "s0"}
    _fill(manifest.staging(out), new)
    manifest.swap(out)
    assert _listing(out) == new
    assert _listing(manifest.staging(out)) == {}


def test_swap_without_a_committed_staging_manifest_keeps_the_old_output(out):
    """An --overwrite run killed before its commit leaves `<out>.next` without a manifest: the finished old
    output must stay. Bug caught: deleting the old output before checking that the new one committed."""
    old = {manifest.MANIFEST: "old", "shards/000.tar": "old0"}
    _fill(out, old)
    _fill(manifest.staging(out), {"shards/000.tar": "half-written"})
    manifest.swap(out)
    assert _listing(out) == old


def test_swap_finishes_a_swap_that_stopped_half_way(out):
    """A swap killed mid-copy leaves the old output deleted and part of the new one copied, with the
    staging prefix (manifest included) intact; the next swap must complete it. Bug caught: a swap that
    deletes the staging manifest first (then nothing finishes the copy) or skips objects already there."""
    new = {manifest.MANIFEST: "new", "shards/000.tar": "new0", "shards/001.tar": "new1"}
    _fill(manifest.staging(out), new)
    _fill(out, {"shards/000.tar": "new0"})  # what the stopped copy had written, without a manifest yet
    manifest.swap(out)
    assert _listing(out) == new
    assert _listing(manifest.staging(out)) == {}
