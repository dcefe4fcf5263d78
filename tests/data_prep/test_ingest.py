"""The ingest stage, with real img2dataset downloads from the synthetic source on 127.0.0.1."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_prep.ingest.outcomes import classify
from flows.registry import run as run_stage
from ldm.io import storage
from ldm.io.manifest import StageError
from tests.helpers import make_config, raw_samples, source_rows


def test_every_broken_row_ends_in_its_failure_count(ingested):
    cfg, manifest = ingested
    expected = manifest["source_manifest"]["expected_outcomes"]
    assert manifest["counts"] == expected
    assert manifest["counts"]["success"] == manifest["source_manifest"]["good_rows"] == cfg.source.num_samples


def test_shards_hold_exactly_the_good_rows_with_their_captions_and_ratings(ingested):
    cfg, manifest = ingested
    samples = raw_samples(cfg.workdir)
    rows = source_rows(cfg.workdir)
    assert len(samples) == manifest["source_manifest"]["good_rows"]
    assert len({s["key"] for s in samples}) == len(samples)
    paths = [urlsplit(s["json"]["url"]).path for s in samples]
    assert len(set(paths)) == len(paths)  # the duplicate URL was fetched once
    from ldm.synthetic import describe

    for s, path in zip(samples, paths, strict=True):
        row = rows[path]
        index = int(path.rsplit("/", 1)[1].split(".")[0])
        spec = describe(cfg.source.seed, index, cfg.source.image_size)
        assert s["txt"] == s["json"]["caption"] == spec.caption
        assert s["json"]["rating"] == row["rating"] == spec.rating
        assert (s["json"]["WIDTH"], s["json"]["HEIGHT"]) == (spec.width, spec.height)
        assert Image.open(io.BytesIO(s["jpg"])).size == (cfg.ingest.resolution,) * 2


def test_manifest_counts_what_the_shards_on_disk_hold(ingested):
    """Every figure is recounted from the files, not from the stats img2dataset wrote or the dict the stage returned.

    Bugs caught: a shard's `samples` taken from another shard's stats or counting failed rows (each tar's .jpg
    members are counted here); `bytes` summing the stats/parquet files too, or only the last shard; `rows_in`
    counting the rows after the pre-download drops; `images_per_s` divided by total_s or counting all rows; the
    on-disk manifest missing fields the stage returned (read back from disk, compared field by field below).
    """
    import tarfile

    cfg, returned = ingested
    raw = Path(cfg.workdir) / "raw"
    manifest = storage.read_json(str(raw / "manifest.json"))
    assert not (raw / "_run.json").exists()
    shards = sorted((raw / "shards").glob("*.tar"))
    assert [s["name"] for s in manifest["shards"]] == [p.name for p in shards]
    for shard, tar in zip(manifest["shards"], shards, strict=True):
        with tarfile.open(tar) as t:
            assert shard["samples"] == sum(m.name.endswith(".jpg") for m in t.getmembers()), tar.name
    assert manifest["bytes"] == sum(p.stat().st_size for p in shards)
    source_rows_n = pq.read_metadata(Path(cfg.workdir) / "source" / "urls.parquet").num_rows
    assert manifest["rows_in"] == source_rows_n == manifest["source_manifest"]["rows"]
    dropped_before_download = sum(manifest["counts"][k] for k in ("duplicate_url", "empty_caption", "invalid_caption"))
    assert (
        manifest["rows_downloaded"]
        == source_rows_n - dropped_before_download
        == sum(s["rows"] for s in manifest["shards"])
    )
    successes = sum(s["samples"] for s in manifest["shards"])
    assert manifest["counts"]["success"] == successes
    assert manifest["images_per_s"] == pytest.approx(successes / manifest["timings"]["download_s"], rel=0.02)
    assert manifest["config"]["ingest"]["resolution"] == cfg.ingest.resolution == manifest["resolution"]
    assert manifest["config"] == returned["config"] and manifest["counts"] == returned["counts"]


def test_an_image_served_with_x_robots_tag_noai_is_counted_as_opted_out(ingested):
    """The synthetic server sends `X-Robots-Tag: noai` with a good image for the opted_out rows.

    Bugs caught: ingest not passing disallowed_header_directives to img2dataset (the image would be downloaded
    and counted as a success: the shards would hold a 121st sample), or the refusal message falling through to
    other_error. The row's caption is a normal one, so only the header can exclude it.
    """
    cfg, manifest = ingested
    assert cfg.source.broken.opted_out == 1
    assert manifest["counts"]["opted_out"] == 1
    assert "other_error" not in manifest["counts"]
    assert manifest["messages"]["Use of image disallowed by X-Robots-Tag directive"] == 1
    paths = {urlsplit(s["json"]["url"]).path for s in raw_samples(cfg.workdir)}
    assert not any(p.startswith("/noai/") for p in paths)
    assert any(p.startswith("/noai/") for p in source_rows(cfg.workdir))


def test_a_finished_stage_is_skipped(ingested, capsys):
    cfg, manifest = ingested
    assert run_stage("ingest", cfg) == manifest
    assert "up to date" in capsys.readouterr().out


def test_output_from_another_config_is_refused_and_left_untouched(ingested):
    cfg, _ = ingested
    raw = Path(cfg.workdir) / "raw"
    before = {p: p.stat().st_mtime_ns for p in raw.rglob("*")}
    other = make_config(cfg.workdir, "ingest.resolution=64")
    with pytest.raises(StageError, match="different config .* --overwrite"):
        run_stage("ingest", other)
    assert {p: p.stat().st_mtime_ns for p in raw.rglob("*")} == before


def test_overwrite_replaces_output_from_another_config(tmp_path):
    cfg = make_config(tmp_path, "source.num_samples=20", "ingest.samples_per_shard=50")
    run_stage("ingest", cfg)
    other = make_config(tmp_path, "source.num_samples=20", "ingest.samples_per_shard=50", "ingest.resolution=64")
    manifest = run_stage("ingest", other, overwrite=True)
    assert manifest["counts"]["success"] == 20
    assert {Image.open(io.BytesIO(s["jpg"])).size for s in raw_samples(str(tmp_path))} == {(64, 64)}


def _parquet(path: Path, **columns) -> str:
    pq.write_table(pa.table(columns), path)
    return str(path)


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        ({"url": ["http://127.0.0.1:1/a.jpg"], "TEXT": ["a"]}, "no url column 'URL'"),
        ({"URL": ["http://127.0.0.1:1/a.jpg"], "caption": ["a"]}, "no caption column 'TEXT'"),
        ({"URL": pa.array([], pa.string()), "TEXT": pa.array([], pa.string())}, "the URL list is empty"),
    ],
)
def test_bad_url_list_is_refused_before_anything_is_written(tmp_path, columns, message):
    src = _parquet(tmp_path / "list.parquet", **columns)
    cfg = make_config(tmp_path / "w", "source.kind=parquet", f"source.paths=[{src}]")
    with pytest.raises(StageError, match=message) as e:
        run_stage("ingest", cfg)
    assert "list.parquet" in str(e.value) or "empty" in str(e.value)
    assert not (tmp_path / "w").exists()


def test_a_missing_input_file_is_named(tmp_path):
    cfg = make_config(tmp_path / "w", "source.kind=parquet", f"source.paths=[{tmp_path}/nope.parquet]")
    with pytest.raises(StageError, match="nope.parquet does not exist"):
        run_stage("ingest", cfg)
    assert not (tmp_path / "w").exists()


def test_real_laion_columns_are_mapped_and_carried_through(tmp_path, ingested):
    """A LAION-style parquet with other column names and similarity/pwatermark/punsafe, served locally."""
    from data_prep.sources import serve_synthetic

    cfg0, _ = ingested
    with serve_synthetic(cfg0.source, slow_s=2) as base:
        src = _parquet(
            tmp_path / "laion.parquet",
            link=[f"{base}/img/{i}.jpg" for i in range(3)],
            caption_text=["one", "two", "three"],
            similarity=[0.31, 0.29, 0.35],
            pwatermark=[0.1, 0.9, 0.2],
            punsafe=[0.01, 0.02, 0.5],
        )
        cfg = make_config(
            tmp_path / "w",
            "source.kind=parquet",
            f"source.paths=[{src}]",
            "ingest.columns.url=link",
            "ingest.columns.caption=caption_text",
        )
        manifest = run_stage("ingest", cfg)
    assert manifest["counts"] == {"success": 3}
    by_caption = {s["txt"]: s["json"] for s in raw_samples(str(tmp_path / "w"))}
    assert by_caption["two"]["similarity"] == 0.29 and by_caption["two"]["pwatermark"] == 0.9
    assert by_caption["three"]["punsafe"] == 0.5


def test_duplicates_across_files_are_dropped_in_list_order_and_shards_numbered_on(tmp_path, ingested, monkeypatch):
    """Three files, URLs repeated within and across them, deduplicated over several digest partitions.

    Bugs caught: the cross-file duplicate check done per file only (b's copy of a's URL downloaded twice); a later
    copy kept instead of the first in list order (files sorted, then rows); duplicates counted once per partition
    or not at all; shard ids restarting at 0 in each file, or a file's last short shard merged into the next file's
    (img2dataset numbers them on, each file's shards its own)."""
    from data_prep.ingest import cluster
    from data_prep.sources import serve_synthetic

    monkeypatch.setattr(cluster, "PARTITION_ROWS", 4)  # this 11-row list gets 3 digest partitions
    cfg0, _ = ingested
    folder = tmp_path / "urls"
    folder.mkdir()
    lists = {"a.parquet": [0, 1, 2, 1], "b.parquet": [3, 0, 4], "c.parquet": [5, 4, 6, 7]}  # image ids, in file order
    with serve_synthetic(cfg0.source, slow_s=2) as base:
        for name, ids in lists.items():
            _parquet(folder / name, URL=[f"{base}/img/{i}.jpg" for i in ids],
                     TEXT=[f"{name} row {k}" for k in range(len(ids))])  # fmt: skip
        cfg = make_config(tmp_path / "w", "source.kind=parquet", f"source.paths=[{folder}]",
                          "ingest.samples_per_shard=2")  # fmt: skip
        manifest = run_stage("ingest", cfg)
    seen: set[int] = set()
    kept: list[tuple[str, int]] = []
    for name, ids in lists.items():  # the recount: one pass in list order, the first copy wins
        kept += [(name, k) for k, i in enumerate(ids) if not (i in seen or seen.add(i))]
    duplicates = sum(len(ids) for ids in lists.values()) - len(kept)
    assert manifest["counts"] == {"duplicate_url": duplicates, "success": len(kept)}
    assert sorted(s["txt"] for s in raw_samples(str(tmp_path / "w"))) == sorted(f"{n} row {k}" for n, k in kept)
    per_file = [sum(1 for n, _ in kept if n == name) for name in lists]  # 3, 1, 3 rows -> shards of 2,1 | 1 | 2,1
    shard_rows = [r for rows in per_file for r in [2] * (rows // 2) + [rows % 2] * (rows % 2)]
    assert [(s["name"], s["rows"]) for s in manifest["shards"]] == [
        (f"{i:05d}.tar", r) for i, r in enumerate(shard_rows)
    ]


def test_a_killed_ingest_resumes_only_missing_shards(tmp_path, ingested):
    ref_cfg, ref = ingested
    overrides = ["--set", "source.delay_ms=150", "--set", "ingest.threads=2", "--set", "ingest.samples_per_shard=20"]
    cmd = [
        sys.executable,
        "-m",
        "flows.cli",
        "stage",
        "ingest",
        "--profile",
        "test",
        "--workdir",
        str(tmp_path),
        *overrides,
    ]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shards = tmp_path / "raw" / "shards"
    deadline = time.monotonic() + 120
    while len(list(shards.glob("*_stats.json"))) < 2:
        assert proc.poll() is None, "ingest finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.1)
    # The stage, its local Ray cluster and the source server. Ray's workers run in process groups of their own and
    # notice their raylet's death within a second: an attempt they finish then must not be published.
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = {p.name: p.stat().st_mtime_ns for p in shards.glob("*_stats.json")}
    assert not (tmp_path / "raw" / "manifest.json").exists()

    cfg = make_config(tmp_path, *overrides[1::2])
    manifest = run_stage("ingest", cfg)
    assert manifest["shards_resumed"] == len(done_before) < len(manifest["shards"])
    for name, mtime in done_before.items():  # finished shards were not redone
        assert (shards / name).stat().st_mtime_ns == mtime
    assert manifest["counts"] == ref["counts"]
    resumed = {(urlsplit(s["json"]["url"]).path, s["txt"]) for s in raw_samples(str(tmp_path))}
    uninterrupted = {(urlsplit(s["json"]["url"]).path, s["txt"]) for s in raw_samples(ref_cfg.workdir)}
    assert resumed == uninterrupted


def test_ingest_writes_to_s3(s3_bucket):
    import ray

    ray.shutdown()  # the Ray workers must start with the moto endpoint in their environment
    try:
        workdir = f"{s3_bucket}/w"
        cfg = make_config(workdir, "source.num_samples=30", "source.broken.slow_response=0")
        manifest = run_stage("ingest", cfg)
        assert manifest["counts"]["success"] == 30
        assert storage.read_json(f"{workdir}/raw/manifest.json")["counts"] == manifest["counts"]
        samples = raw_samples(workdir)
        assert len(samples) == 30 and all(s["txt"] for s in samples)
        assert run_stage("ingest", cfg)["finished"] == manifest["finished"]  # up to date on s3 too
        fs, path = storage.fs_for(f"{workdir}/raw")
        assert not [p for p in fs.find(path) if "/_tmp/" in p or "/_attempts/" in p or "/_prepared/" in p]
    finally:
        ray.shutdown()


@pytest.mark.parametrize(
    ("message", "outcome"),
    [
        ("HTTP Error 404: Not Found", "http_error"),
        ("<urlopen error timed out>", "timeout"),
        ("<urlopen error [Errno 111] Connection refused>", "connection_error"),
        ("<urlopen error [Errno 101] Network is unreachable>", "connection_error"),
        ("<urlopen error [Errno -2] Name or service not known>", "dns_error"),
        ("Image decoding error", "decode_error"),
        ("Use of image disallowed by X-Robots-Tag directive", "opted_out"),
        ("something new", "other_error"),
        ("success", "success"),
    ],
)
def test_img2dataset_messages_are_classified(message, outcome):
    assert classify(message) == outcome


def test_a_new_file_in_the_source_folder_is_not_up_to_date(tmp_path, ingested):
    """Bug caught: ingest's identity covering the source's paths but not its files, so a file added to a parquet
    folder after a finished ingest is silently ignored ("up to date") and shifts shard ids on a resume.
    Chosen behaviour: refuse in one line (the user reruns with --overwrite), never report up to date."""
    from data_prep.sources import serve_synthetic

    cfg0, _ = ingested
    folder = tmp_path / "urls"
    folder.mkdir()
    with serve_synthetic(cfg0.source, slow_s=2) as base:
        _parquet(folder / "a.parquet", URL=[f"{base}/img/{i}.jpg" for i in range(2)], TEXT=["one", "two"])
        cfg = make_config(tmp_path / "w", "source.kind=parquet", f"source.paths=[{folder}]")
        assert run_stage("ingest", cfg)["counts"] == {"success": 2}
        _parquet(folder / "b.parquet", URL=[f"{base}/img/{i}.jpg" for i in range(2, 4)], TEXT=["three", "four"])
        with pytest.raises(StageError, match="--overwrite") as e:
            run_stage("ingest", cfg)
        assert "\n" not in str(e.value)
        assert run_stage("ingest", cfg, overwrite=True)["counts"] == {"success": 4}


def test_parallelism_knobs_are_not_identity():
    """Bug caught: threads/processes/batch sizes/actors in the output's identity, so a killed run resumed with
    other parallelism is refused (and --overwrite throws its finished work away)."""
    from flows.registry import stage
    from ldm.stage import config_of

    base = make_config("w")
    knobs = make_config(
        "w", "ingest.threads=3", "ingest.processes=2", "ingest.timeout_s=30", "precompute.actors=3",
        "precompute.batch_size=7", "precompute.object_store_mb=1024", "filter.batch_size=5",
    )  # fmt: skip
    for name in ("ingest", "filter", "precompute"):
        assert config_of(stage(name), knobs) == config_of(stage(name), base), name
    assert config_of(stage("precompute"), make_config("w", "precompute.half=false")) != config_of(
        stage("precompute"), base
    )  # half precision changes the latents: identity
