"""The stage protocol's identity and manifest code (ldm/io/manifest.py, the identity half of ldm/stage.py), on a
tiny real stage (tests/ldm/tiny_stage.py): fast, no Ray, no servers. `make mutation` runs these."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from ldm.io import manifest, storage
from ldm.io.manifest import INTENT, MANIFEST, OutputState, StageError
from ldm.stage import (
    Stage,
    Workdir,
    check_made_by,
    config_of,
    content_id,
    finished_input,
    resolve,
    run_stage,
    weight_ids,
)
from tests.helpers import make_config

UP = Stage(name="ingest", fields=("seed", "ingest.resolution"), work="tests.ldm.tiny_stage:work",
           summary="tests.ldm.tiny_stage:summary")  # fmt: skip
# inputs read the config, as the registry's do (train-aesthetic needs ingest only when it trains its MLP)
DOWN = Stage(name="train-clip", fields=("clip",), work="tests.ldm.tiny_stage:work",
             inputs=lambda cfg: ("ingest",) if cfg.aesthetic.weights is None else ())  # fmt: skip


def _calls(workdir: Path) -> int:
    path = workdir / "calls.txt"
    return int(path.read_text()) if path.exists() else 0


def test_digest_is_a_sorted_json_sha256_prefix():
    """Bugs caught: key order changing the hash (sort_keys dropped: the same config looks new after a reload),
    a hash too short, or one that ignores values of non-JSON types (default=str)."""
    want = hashlib.sha256(json.dumps({"a": 1, "b": [2, 3]}, sort_keys=True).encode()).hexdigest()[:16]
    assert manifest.digest({"b": [2, 3], "a": 1}) == want
    assert manifest.digest({"a": Path("x")}) != manifest.digest({"a": Path("y")})


def test_check_output_states(tmp_path):
    """Bugs caught: a partial output (intent only) taken as done; output of another config replaced without
    --overwrite, or refused with it; files with no manifest or intent (another tool's) treated as fresh."""
    out = storage.normalize(str(tmp_path / "out"))
    assert manifest.check_output(out, "h1", overwrite=False) is OutputState.FRESH
    manifest.begin(out, "ingest", "h1")
    assert storage.read_json(storage.join(out, INTENT))["config_hash"] == "h1"
    assert manifest.check_output(out, "h1", overwrite=False) is OutputState.RESUME
    with pytest.raises(StageError, match=r"different config h1 \(this config: h2\); pass --overwrite") as e:
        manifest.check_output(out, "h2", overwrite=False)
    assert "\n" not in str(e.value)
    assert manifest.check_output(out, "h2", overwrite=True) is OutputState.REPLACE
    m = manifest.commit(out, "ingest", "h1", {"seed": 0}, rows=3)
    assert m["rows"] == 3 and m["stage"] == "ingest" and m["config"] == {"seed": 0}
    assert storage.read_json(storage.join(out, MANIFEST)) == m and not storage.exists(storage.join(out, INTENT))
    assert manifest.check_output(out, "h1", overwrite=False) is OutputState.DONE
    with pytest.raises(StageError, match="different config h1"):
        manifest.check_output(out, "h2", overwrite=False)
    stray = storage.normalize(str(tmp_path / "stray"))
    storage.write_bytes_atomic(storage.join(stray, "x"), b"x")
    with pytest.raises(StageError, match="different unknown config"):
        manifest.check_output(stray, "h1", overwrite=False)
    assert manifest.check_output(stray, "h1", overwrite=True) is OutputState.REPLACE


def test_code_version_names_the_package_and_commit(tmp_path, monkeypatch):
    """Bugs caught: manifests recording no code version (or a constant, or bytes): outputs of other code look the
    same; the commit looked up in the caller's cwd instead of the package's checkout; no git crashing a stage."""
    import subprocess
    from importlib import metadata

    package = Path(manifest.__file__).parent
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=package, capture_output=True, text=True)
    version = metadata.version("ldm-pipeline")
    monkeypatch.chdir(tmp_path)  # not a checkout: the commit must come from the package's folder
    if sha.returncode == 0:
        assert manifest.code_version() == f"{version}+{sha.stdout.strip()}"
    monkeypatch.setenv("PATH", str(tmp_path))  # no git at all
    assert manifest.code_version() == version


def test_manifest_and_intent_fields(tmp_path):
    """Bug caught: the intent or manifest losing the fields other tools read (stage, start and finish times,
    the code version)."""
    out = storage.normalize(str(tmp_path / "out"))
    manifest.begin(out, "ingest", "h1")
    intent = storage.read_json(storage.join(out, INTENT))
    assert intent["stage"] == "ingest" and intent["started"] > 1e9
    m = manifest.commit(out, "ingest", "h1", {})
    assert m["code_version"] == manifest.code_version() and m["finished"] >= intent["started"]


@pytest.mark.parametrize("scheme", ["file", "memory"])
def test_swap_replaces_only_with_a_committed_staging_folder(tmp_path, scheme):
    """Bugs caught: a swap that deletes the old output when the staged one is unfinished (a killed --overwrite
    loses both), or leaves the staging folder or the old files behind. `memory://` takes the object-store path
    (copy every object, the manifest last, then delete the staging prefix) that S3 takes."""
    import fsspec

    root = storage.normalize(str(tmp_path)) if scheme == "file" else f"memory://swap-{tmp_path.name}"
    out = storage.join(root, "out")
    staged = manifest.staging(out)
    assert staged == out + ".next" and manifest.staging(out + "/") == out + ".next"
    assert manifest.staging("file:///a/boX/") == "file:///a/boX.next"
    storage.write_bytes_atomic(storage.join(out, "old.txt"), b"old")
    storage.write_bytes_atomic(storage.join(staged, "new.txt"), b"new")
    storage.write_bytes_atomic(storage.join(staged, "sub", "deep.txt"), b"deep")
    manifest.swap(out)  # the staged run has not committed: nothing moves
    assert storage.exists(storage.join(out, "old.txt")) and storage.exists(storage.join(staged, "new.txt"))
    manifest.commit(staged, "ingest", "h2", {})
    manifest.swap(out)
    fs, path = storage.fs_for(out)
    found = sorted(p[len(path) + 1 :] for p in fs.find(path))
    assert found == [MANIFEST, "new.txt", "sub/deep.txt"], found
    assert (
        fs.cat(f"{path}/sub/deep.txt") == b"deep"
        and storage.read_json(storage.join(out, MANIFEST))["stage"] == "ingest"
    )
    assert not storage.exists(staged)
    if scheme == "memory":
        fsspec.filesystem("memory").rm(path, recursive=True)


def test_root_cause_unwraps_ray_style_and_chained_errors():
    """Bugs caught: the CLI printing a wrapper's message instead of the StageError inside it; a loop on a cycle."""

    class Wrapper(Exception):
        def __init__(self, cause: BaseException):
            super().__init__("wrapped")
            self.cause = cause

    inner = StageError("the real one")
    try:
        raise RuntimeError("outer") from Wrapper(inner)
    except RuntimeError as e:
        assert manifest.root_cause(e) is inner
        assert isinstance(manifest.root_cause(e, stop=(Wrapper,)), Wrapper)
    a, b = RuntimeError("a"), RuntimeError("b")
    a.__cause__, b.__cause__ = b, a
    assert manifest.root_cause(a) in (a, b)
    plain = ValueError("plain")
    assert manifest.root_cause(plain) is plain


def test_identity_leaves_knobs_out_and_keeps_what_defines_the_output():
    """Bugs caught: parallelism knobs in the identity (a resume with other threads refused); nested sections
    (source.broken) dumped with their knobs or not at all."""
    base, knobs = make_config("w"), make_config("w", "ingest.threads=3", "ingest.processes=2")
    assert resolve(base, "ingest") == resolve(knobs, "ingest")
    assert "threads" not in resolve(base, "ingest") and resolve(base, "ingest")["resolution"] == 32
    assert resolve(base, "ingest.resolution") == 32
    assert resolve(base, "source")["broken"]["http_404"] == 2
    assert resolve(make_config("w", "source.broken.http_404=0"), "source")["broken"]["http_404"] == 0
    assert config_of(UP, base) == {"seed": 0, "ingest.resolution": 32}


def test_check_made_by_names_the_first_differing_leaf(tmp_path):
    """Bugs caught: an input made from another config accepted; the message naming the section, not the field."""
    cfg = make_config(tmp_path)
    recorded = {"seed": 0, "clip": {**resolve(cfg, "clip"), "epochs": 7}}
    with pytest.raises(StageError, match=r"made with clip.epochs=7, this config has clip.epochs=30; rerun the x"):
        check_made_by({"config": recorded}, cfg, "F", "x")
    check_made_by({"config": {"seed": 0, "clip": resolve(cfg, "clip")}}, cfg, "F", "x")  # equal: no error
    with pytest.raises(StageError, match=r"made with no.such=1, this config has no.such=None"):
        check_made_by({"config": {"no.such": 1}}, cfg, "F", "x")
    long = "y" * 200
    with pytest.raises(StageError) as e:
        check_made_by({"config": {"workdir": long}}, cfg, "F", "x")
    assert f"workdir={repr(long)[:77]}..., this" in str(e.value)  # 80 characters at most


def test_content_id_follows_the_bytes(tmp_path):
    """Bugs caught: weights identified by path (new weights at the same path look unchanged); a folder's id
    ignoring a file's content; a stale cache entry after the file changed."""
    f = tmp_path / "w.bin"
    f.write_bytes(b"one")
    assert content_id(str(f)) == hashlib.sha256(b"one").hexdigest() == content_id(f"file://{f}")
    folder_before = content_id(str(tmp_path))
    f.write_bytes(b"two")  # same size: only the mtime tells the cache the file changed
    os.utime(f, ns=(1, 1))
    assert content_id(str(f)) == hashlib.sha256(b"two").hexdigest()
    assert content_id(str(tmp_path)) != folder_before


def test_weight_ids_refuse_remote_and_missing_paths(tmp_path):
    """Bugs caught: an s3:// or hub URL accepted as weights (downloaded at run time), a missing file found only
    when the loader fails mid-stage."""
    cfg = make_config(tmp_path)
    f = tmp_path / "w.bin"
    f.write_bytes(b"w")

    def stage(path: str) -> Stage:
        return Stage(name="x", fields=(), work="", weights=lambda c: {"clip.weights": path})

    assert weight_ids(stage(str(f)), cfg) == {"clip.weights": hashlib.sha256(b"w").hexdigest()}
    with pytest.raises(StageError, match=r"x: clip.weights = s3://b/w.bin must be a local path"):
        weight_ids(stage("s3://b/w.bin"), cfg)
    with pytest.raises(StageError, match=r"x: clip.weights = .*nope.bin does not exist"):
        weight_ids(stage(str(tmp_path / "nope.bin")), cfg)


def test_run_stage_skips_redoes_refuses_and_replaces(tmp_path, capsys):
    """The protocol end to end on the tiny stage. Bugs caught: a finished stage redone; a changed config
    accepted without --overwrite; an --overwrite output committed under `.next` paths or left there; a
    downstream stage accepting an upstream output of another config or replaced since."""
    cfg = make_config(tmp_path)
    first = run_stage(UP, cfg)
    assert first["written_to"] == f"file://{tmp_path}/raw/data.txt" and first["resumed"] is False
    assert _calls(tmp_path) == 1 and "tiny summary" in capsys.readouterr().out
    assert run_stage(UP, cfg) == first and _calls(tmp_path) == 1  # up to date: the work did not run
    assert "up to date" in capsys.readouterr().out
    down = run_stage(DOWN, cfg)
    assert down["inputs"] == {"ingest": first["config_hash"]} and down["config"] == {"clip": resolve(cfg, "clip")}

    other = make_config(tmp_path, "ingest.resolution=64")
    with pytest.raises(StageError, match="--overwrite"):
        run_stage(UP, other)
    with pytest.raises(StageError) as e:
        run_stage(DOWN, other)  # its input was made with another config: named, with the stage to rerun
    assert str(e.value) == (
        f"file://{tmp_path}/raw was made with ingest.resolution=32, this config has ingest.resolution=64; "
        "rerun the ingest stage (with --overwrite)"
    )
    replaced = run_stage(UP, other, overwrite=True)
    assert replaced["config_hash"] != first["config_hash"] and replaced["written_to"] == first["written_to"]
    assert ".next" not in json.dumps(replaced) and not (tmp_path / "raw.next").exists()
    assert (tmp_path / "raw" / "data.txt").read_text() == "0"
    with pytest.raises(StageError, match=r"made from another ingest output .*rerun the train-clip stage"):
        finished_input(Workdir.of(other), "train-clip", make_config(tmp_path, "ingest.resolution=64"))


def test_run_stage_resumes_and_refuses_a_partial_output(tmp_path, monkeypatch):
    """Bugs caught: an output whose intent matches redone from scratch (not marked resumed); skipped input
    shards committed as a full output; --allow-partial not recorded in the manifest."""
    cfg = make_config(tmp_path)
    out = storage.normalize(str(tmp_path / "raw"))
    manifest.begin(out, "ingest", manifest.digest({"config": config_of(UP, cfg), "weights": {}, "inputs": {}}))
    monkeypatch.setenv("TINY_SKIP", "00001.tar: truncated")
    with pytest.raises(StageError) as e:
        run_stage(UP, cfg)
    assert str(e.value) == (
        "ingest: 1 input shard(s) could not be read (00001.tar: truncated); nothing was committed: repair or remove "
        "them and rerun (finished work is kept), or pass --allow-partial to accept the loss"
    )
    assert not (tmp_path / "raw" / MANIFEST).exists()
    m = run_stage(UP, cfg, allow_partial=True)
    assert m["resumed"] is True and m["partial"] is True and m["skipped"] == ["00001.tar: truncated"]


def test_finished_input_names_what_to_run(tmp_path):
    """Bugs caught: a missing or corrupt input manifest ending as a KeyError/JSONDecodeError traceback."""
    wd = Workdir.of(make_config(tmp_path))
    with pytest.raises(StageError, match=r"raw/manifest.json does not exist: run the ingest stage first"):
        finished_input(wd, "ingest", make_config(tmp_path))
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / MANIFEST).write_text("{not json")
    with pytest.raises(StageError, match=r"is not valid JSON .*rerun the ingest stage with --overwrite"):
        finished_input(wd, "ingest", make_config(tmp_path))


THIRD = Stage(name="train-aesthetic", fields=("aesthetic",), work="tests.ldm.tiny_stage:work",
              inputs=lambda cfg: ("ingest", "train-clip"))  # fmt: skip


def test_workdir_folders_follow_the_run_id():
    """Bug caught: every training run writing to runs/default (one run's checkpoints overwriting another's)."""
    wd = Workdir.of(make_config("/w", "train.run_id=abc"))
    assert wd.output("train") == "file:///w/runs/abc" and wd.output("evaluate") == "file:///w/runs/abc/eval"
    staged = Workdir(wd.url, staged=(("ingest", "file:///w/raw.next"),), run="abc")
    assert staged.output("ingest") == "file:///w/raw.next" and staged.output("filter") == "file:///w/filtered"


def test_begin_writes_the_intent_once(tmp_path):
    """Bugs caught: the intent never written (a killed first run then looks like foreign output), or rewritten on
    every call (its start time then moves)."""
    from ldm.stage import StageRun

    cfg = make_config(tmp_path)
    out = storage.normalize(str(tmp_path / "raw"))
    run = StageRun(UP, cfg, Workdir.of(cfg), out, "h1", {}, {}, resumed=False)
    run.begin()
    intent = tmp_path / "raw" / INTENT
    assert json.loads(intent.read_text())["stage"] == "ingest"
    intent.unlink()
    run.begin()
    assert not intent.exists()


def test_content_id_switches_to_size_and_mtime_past_one_gib(tmp_path):
    """Bugs caught: hashing multi-GB checkpoints on every run (the threshold mistyped), or never hashing; two
    files with the same size and mtime sharing a cached id. The big file is sparse: nothing is read or written."""
    small = tmp_path / "small.bin"
    small.write_bytes(b"x" * 100)
    assert content_id(str(small)) == hashlib.sha256(b"x" * 100).hexdigest()
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        f.truncate(2**30 + 1)
    st = big.stat()
    assert content_id(str(big)) == f"size{2**30 + 1}-mtime{st.st_mtime_ns}"
    twin = tmp_path / "twin.bin"
    twin.write_bytes(b"y" * 100)
    os.utime(twin, ns=(small.stat().st_mtime_ns,) * 2)
    assert content_id(str(twin)) == hashlib.sha256(b"y" * 100).hexdigest()


def test_weight_ids_accept_file_urls(tmp_path):
    """Bug caught: a `file://` weights URL refused as remote, or looked up with its scheme as a path."""
    f = tmp_path / "w.bin"
    f.write_bytes(b"w")
    stage = Stage(name="x", fields=(), work="", weights=lambda c: {"w": f"file://{c.workdir}/w.bin"})
    assert weight_ids(stage, make_config(tmp_path)) == {"w": hashlib.sha256(b"w").hexdigest()}


def test_first_difference_covers_added_removed_and_retyped_fields(tmp_path):
    """Bugs caught: a field present on one side only (added to or removed from the schema) not seen as a
    difference; a section replaced by a plain value crashing the comparison; an 80-character value truncated."""
    cfg = make_config(tmp_path)
    with pytest.raises(StageError, match=r"made with clip.removed=1, this config has clip.removed=None"):
        check_made_by({"config": {"clip": {**resolve(cfg, "clip"), "removed": 1}}}, cfg, "F", "x")
    with pytest.raises(StageError, match=r"made with seed=\{'a': 1\}, this config has seed=0"):
        check_made_by({"config": {"seed": {"a": 1}}}, cfg, "F", "x")
    exact = "z" * 78  # repr adds two quotes: 80 characters, shown whole
    with pytest.raises(StageError) as e:
        check_made_by({"config": {"workdir": exact}}, cfg, "F", "x")
    assert f"workdir={exact!r}, this" in str(e.value)
    with pytest.raises(StageError) as e:
        check_made_by({"config": {"workdir": exact + "z"}}, cfg, "F", "x")
    assert f"workdir={repr(exact + 'z')[:77]}..., this" in str(e.value)


def test_a_chain_of_three_checks_each_link_once(tmp_path):
    """Bugs caught: an input's own inputs never compared (a stage two links down replaced, unnoticed), the
    comparison done on a missing key (every chain refused), a shared input memoised as None (a diamond: the
    third stage reads ingest directly and through train-clip)."""
    cfg = make_config(tmp_path)
    up, down = run_stage(UP, cfg), run_stage(DOWN, cfg)
    third = run_stage(THIRD, cfg)
    assert third["inputs"] == {"ingest": up["config_hash"], "train-clip": down["config_hash"]}
    assert third["inputs_seen"] == ["ingest", "train-clip"]
    run_stage(UP, make_config(tmp_path, "ingest.resolution=64"), overwrite=True)
    (tmp_path / "models" / "clip" / MANIFEST).write_text(
        json.dumps({**down, "config": {"clip": resolve(cfg, "clip")}})
    )  # train-clip still claims the old ingest: the chain must notice
    with pytest.raises(StageError) as e:
        finished_input(Workdir.of(cfg), "train-clip", make_config(tmp_path, "ingest.resolution=64"))
    assert str(e.value).startswith(f"file://{tmp_path}/models/clip was made from another ingest output")


def test_run_stage_records_what_defines_the_output(tmp_path, monkeypatch):
    """The manifest's identity parts, each changed on its own. Bugs caught: weights or source files left out of
    the identity (new weights or a new URL list "up to date"); the manifest not naming its stage or weights;
    the work not given its config or inputs; library chatter not in W/logs/<stage>.log."""
    (tmp_path / "source.txt").write_text("v1")
    w = tmp_path / "w"
    (w / "models").mkdir(parents=True)
    (w / "weights.bin").write_bytes(b"a")
    stage = Stage(name="ingest", fields=("seed",), work="tests.ldm.tiny_stage:work",
                  weights=lambda c: {"x.weights": f"{c.workdir}/weights.bin"},
                  sources="tests.ldm.tiny_stage:sources")  # fmt: skip
    cfg = make_config(w)
    m = run_stage(stage, cfg)
    assert m["stage"] == "ingest" and m["weight_ids"] == {"x.weights": hashlib.sha256(b"a").hexdigest()}
    assert m["config_seen"] == {"seed": 0} and m["inputs_seen"] == []
    assert "tiny: library chatter" in (w / "logs" / "ingest.log").read_text()
    assert run_stage(stage, cfg)["config_hash"] == m["config_hash"]  # nothing changed: up to date
    (tmp_path / "source.txt").write_text("v2")
    with pytest.raises(StageError, match="--overwrite"):
        run_stage(stage, cfg)
    (tmp_path / "source.txt").write_text("v1")
    (w / "weights.bin").write_bytes(b"b")
    with pytest.raises(StageError, match="--overwrite"):
        run_stage(stage, cfg)


def test_overwrite_builds_beside_and_discards_a_stale_staging_folder(tmp_path):
    """Bugs caught: the work writing into the live folder during --overwrite (the old output half-replaced if
    killed, and the new one missing what was written there); a staging folder left by an --overwrite of a third
    config reused or refused instead of cleared; one left by a killed --overwrite of this config not resumed."""
    run_stage(UP, make_config(tmp_path))
    manifest.begin(storage.normalize(str(tmp_path / "raw.next")), "ingest", "stale-config")
    (tmp_path / "raw.next" / "stale.txt").write_text("from another config")
    m = run_stage(UP, make_config(tmp_path, "ingest.resolution=64"), overwrite=True)
    assert m["output_seen"] == f"file://{tmp_path}/raw" and m["resumed"] is False  # `.next` rewritten on commit
    assert (tmp_path / "raw" / "marker.txt").exists()  # written through run.workdir.output: the staged folder
    assert not (tmp_path / "raw" / "stale.txt").exists() and not (tmp_path / "raw.next").exists()
    third = make_config(tmp_path, "ingest.resolution=128")
    chash = manifest.digest({"config": config_of(UP, third), "weights": {}, "inputs": {}})
    manifest.begin(storage.normalize(str(tmp_path / "raw.next")), "ingest", chash)  # a killed --overwrite
    assert run_stage(UP, third, overwrite=True)["resumed"] is True
