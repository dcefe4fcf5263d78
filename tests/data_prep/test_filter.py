"""The filter stage on the test profile: scores, thresholds, report, corrupt shards, resume."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_prep.filter import drop_reason
from flows.registry import run as run_stage
from ldm.config import FilterConfig
from ldm.io import storage
from ldm.io.manifest import StageError
from ldm.io.shards import iter_samples
from tests.helpers import free_port, make_config


def test_kept_samples_pass_every_threshold_and_carry_their_scores(components):
    cfg, m = components
    report = storage.read_json(str(Path(cfg.workdir) / "filtered" / "filter_report.json"))
    counts = report["counts"]
    raw_total = storage.read_json(str(Path(cfg.workdir) / "raw" / "manifest.json"))["counts"]["success"]
    assert counts["samples"] == raw_total
    assert counts["kept"] + sum(counts[r] for r in ("low_aesthetic", "low_similarity", "too_small")) == raw_total
    kept = [
        s for tar in sorted((Path(cfg.workdir) / "filtered" / "shards").glob("*.tar")) for s in iter_samples(str(tar))
    ]
    assert len(kept) == counts["kept"] == m["filter"]["counts"]["kept"] > 0
    for s in kept:
        assert s["json"]["aesthetic"] >= cfg.filter.aesthetic_min - 1e-4
        assert s["json"]["similarity"] >= cfg.filter.similarity_min - 1e-4
        assert s["jpg"][:2] == b"\xff\xd8" and s["txt"] == s["json"]["caption"]
    gt = report["ground_truth"]
    assert 0 <= gt["precision"] <= 1 and gt["rated_samples"] == raw_total
    assert (Path(cfg.workdir) / "filtered" / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_aesthetic_training_beats_its_untrained_self(components):
    _, m = components
    assert m["aesthetic"]["metrics"]["spearman"] > m["aesthetic"]["metrics"]["spearman_untrained"] + 0.1


def test_a_finished_filter_is_skipped(components, capsys):
    cfg, m = components
    assert run_stage("filter", cfg) == m["filter"]
    assert "up to date" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("meta", "scores", "reason"),
    [
        ({}, (6.0, 0.3), None),
        ({}, (4.9, 0.3), "low_aesthetic"),
        ({}, (6.0, 0.1), "low_similarity"),
        ({"original_width": 300, "original_height": 200}, (6.0, 0.3), "too_small"),
        ({"pwatermark": 0.95}, (6.0, 0.3), "watermark"),
        ({"punsafe": 0.9}, (6.0, 0.3), "unsafe"),
        ({"pwatermark": None, "punsafe": None, "original_width": 512, "original_height": 512}, (6.0, 0.3), None),
    ],
)
def test_drop_reason(meta, scores, reason):
    fcfg = FilterConfig(aesthetic_min=5.0, similarity_min=0.2, min_size=256, pwatermark_max=0.8, punsafe_max=0.5)
    assert drop_reason(meta, *scores, fcfg) == reason


def _copy_components(cfg, tmp_path: Path) -> Path:
    for sub in ("raw", "models"):
        shutil.copytree(Path(cfg.workdir) / sub, tmp_path / sub)
    return tmp_path


def _kept_keys(workdir: Path) -> dict[str, list[str]]:
    tars = sorted((workdir / "filtered" / "shards").glob("*.tar"))
    return {t.name: [x["key"] for x in iter_samples(str(t))] for t in tars}


def test_a_corrupt_shard_fails_the_stage_and_a_rerun_retries_it(components, tmp_path):
    """Bug caught: a corrupt raw shard skipped with a warning while the stage commits as done (a permanent loss)."""
    cfg, m = components
    workdir = _copy_components(cfg, tmp_path)
    shards = sorted((workdir / "raw" / "shards").glob("*.tar"))
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])  # truncated mid-member
    with pytest.warns(UserWarning, match=shards[1].name), pytest.raises(StageError, match="--allow-partial") as e:
        run_stage("filter", make_config(workdir))
    assert shards[1].name in str(e.value) and "\n" not in str(e.value)
    assert not (workdir / "filtered" / "manifest.json").exists()
    assert not (workdir / "filtered" / "shards" / f"{shards[1].stem}_stats.json").exists()  # no done-marker
    shards[1].write_bytes(data)  # repaired: the rerun resumes and retries the skipped shard
    resumed = run_stage("filter", make_config(workdir))
    assert resumed["skipped_shards"] == 0 and not resumed["partial"]
    assert resumed["counts"] == m["filter"]["counts"] and _kept_keys(workdir) == _kept_keys(Path(cfg.workdir))


def test_allow_partial_commits_and_says_so(components, tmp_path):
    """Bug caught: --allow-partial not threaded through, or a partial output not marked as one in its manifest."""
    cfg, _ = components
    workdir = _copy_components(cfg, tmp_path)
    shards = sorted((workdir / "raw" / "shards").glob("*.tar"))
    shards[1].write_bytes(shards[1].read_bytes()[:1000])
    cmd = [sys.executable, "-m", "flows.cli", "stage", "filter", "--profile", "test", "--workdir", str(workdir)]
    refused = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1 and shards[1].name in refused.stderr
    done = subprocess.run([*cmd, "--allow-partial"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    manifest = storage.read_json(str(workdir / "filtered" / "manifest.json"))
    assert manifest["partial"] and manifest["skipped_shards"] == 1 and shards[1].name in manifest["skipped"][0]


def _filter_killed_at(workdir: Path, pause: str, *args: str) -> None:
    """Run `ldm stage filter` in a subprocess, SIGKILL it right after the write named by pause (<shard>:<write>)."""
    marker = workdir / "paused"
    env = {**os.environ, "LDM_FILTER_PAUSE": f"{pause}:{marker}"}
    cmd = [sys.executable, "-m", "flows.cli", "stage", "filter", "--profile", "test", "--workdir", str(workdir), *args]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not marker.exists():
        assert proc.poll() is None, "filter ended before it reached the kill point"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    marker.unlink()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_killed_filter_redoes_only_unfinished_shards(components, tmp_path, seed):
    """Bugs caught: a shard whose tar (or scores) was written before the kill counted as done; finished shards
    scored again; a resumed run's report differing from an uninterrupted one. The kill is a real SIGKILL."""
    cfg, m = components
    workdir = _copy_components(cfg, tmp_path)
    names = sorted(p.stem for p in (workdir / "raw" / "shards").glob("*.tar"))
    rng = random.Random(seed)
    _filter_killed_at(workdir, f"{rng.choice(names)}:{rng.choice(['tar', 'scores', 'stats'])}")
    out = workdir / "filtered" / "shards"
    finished = {p: p.stat().st_mtime_ns for p in out.glob("*_stats.json")}
    assert not (workdir / "filtered" / "manifest.json").exists()
    resumed = run_stage("filter", make_config(workdir))
    assert {p: p.stat().st_mtime_ns for p in finished} == finished  # finished shards were not redone
    assert resumed["counts"] == m["filter"]["counts"] and resumed["shards"] == m["filter"]["shards"]
    assert _kept_keys(workdir) == _kept_keys(Path(cfg.workdir))


def test_a_killed_overwrite_leaves_the_old_output_usable(components, tmp_path):
    """Bug caught: --overwrite deleting the finished output before the new run succeeded."""
    cfg, m = components
    workdir = _copy_components(cfg, tmp_path)
    shutil.copytree(Path(cfg.workdir) / "filtered", workdir / "filtered")
    first = sorted(p.stem for p in (workdir / "raw" / "shards").glob("*.tar"))[1]
    _filter_killed_at(workdir, f"{first}:scores", "--overwrite", "--set", "filter.aesthetic_min=3.0")
    assert run_stage("filter", make_config(workdir)) == m["filter"]  # the old output: intact and up to date
    assert _kept_keys(workdir) == _kept_keys(Path(cfg.workdir))
    new = run_stage("filter", make_config(workdir, "filter.aesthetic_min=3.0"), overwrite=True)  # resumes the new
    assert new["counts"]["kept"] > m["filter"]["counts"]["kept"] and not (workdir / "filtered.next").exists()
    assert str(workdir / "filtered") in new["report"] and ".next" not in json.dumps(new)


def test_a_tracking_outage_does_not_discard_the_stage(components, tmp_path, monkeypatch):
    """Bug caught: an unreachable MLflow server failing the stage before its manifest commits."""
    cfg, _ = components
    workdir = _copy_components(cfg, tmp_path)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.warns(UserWarning, match="MLflow tracking at .* failed") as warned:
        m = run_stage("filter", make_config(workdir, f"tracking.uri={uri}"))
    assert (workdir / "filtered" / "manifest.json").exists() and m["counts"]["samples"] > 0
    lines = [str(w.message) for w in warned if "MLflow" in str(w.message)]
    assert len(lines) == 1 and "\n" not in lines[0]


def test_a_retrained_scorer_invalidates_the_filtered_output(components, tmp_path):
    """Bug caught: filter reporting "up to date" after the aesthetic MLP it scored with was retrained."""
    cfg, _ = components
    workdir = _copy_components(cfg, tmp_path)
    shutil.copytree(Path(cfg.workdir) / "filtered", workdir / "filtered")
    other = make_config(workdir, "aesthetic.epochs=3")
    run_stage("train-aesthetic", other, overwrite=True)
    with pytest.raises(StageError, match="different config"):
        run_stage("filter", other)
