"""The filter stage on the test profile: scores, thresholds, report, corrupt shards, resume."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from data_prep.filter import drop_reason
from flows.registry import run as run_stage
from ldm.config import FilterConfig
from ldm.io import storage
from ldm.io.shards import iter_samples
from tests.helpers import make_config


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


def test_a_corrupt_shard_is_skipped_and_counted(components, tmp_path):
    cfg, _ = components
    workdir = _copy_components(cfg, tmp_path)
    shards = sorted((workdir / "raw" / "shards").glob("*.tar"))
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])  # truncated mid-member
    with pytest.warns(UserWarning, match=shards[1].name):
        manifest = run_stage("filter", make_config(workdir))
    report = storage.read_json(str(workdir / "filtered" / "filter_report.json"))
    assert manifest["skipped_shards"] == 1 and shards[1].name in report["skipped_shards"][0]
    names = {p.name for p in (workdir / "filtered" / "shards").glob("*.tar")}
    assert names == {p.name for p in shards} - {shards[1].name}


def test_a_crashed_filter_redoes_only_unfinished_shards(components, tmp_path, monkeypatch):
    cfg, _ = components
    workdir = _copy_components(cfg, tmp_path)
    import data_prep.filter as stage

    real, calls = stage.filter_shard, []

    def crash_on_third(url, *args):
        calls.append(url)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")  # what a killed worker looks like to the loop
        return real(url, *args)

    monkeypatch.setattr(stage, "filter_shard", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        run_stage("filter", make_config(workdir))
    assert not (workdir / "filtered" / "manifest.json").exists()
    calls.clear()
    monkeypatch.setattr(stage, "filter_shard", lambda url, *a: calls.append(url) or real(url, *a))
    resumed = run_stage("filter", make_config(workdir))
    total = len(list((workdir / "raw" / "shards").glob("*.tar")))
    assert len(calls) == total - 2  # the two finished shards were not scored again
    assert resumed["counts"] == components[1]["filter"]["counts"]  # same result as an uninterrupted run
