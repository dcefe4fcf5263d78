"""The time budget: a slower CPU gets fewer training steps so the run still fits, planned once per work directory."""

import json

import pytest

from flows.report import closing_lines
from ldm import budget
from ldm.config import BUDGET_PLAN, ConfigError, load_config

# The local profile's reference CPU takes 0.236 s per calibration step; 0.44 s was measured on a slower
# AMD EPYC of the same name (2026-12-06), where the unscaled demo took 31.6 minutes.
SLOW_STEP_S = 0.44


def test_a_slower_cpu_gets_steps_that_fit_the_budget_counting_the_stages_that_do_not_scale():
    # Catches a factor of reference/measured alone (0.54 here): the stages it leaves whole slow down
    # too, and the run would take 21.8 minutes of its 18.
    cfg = load_config("local")
    b = cfg.budget
    plan = budget.make_plan(cfg, SLOW_STEP_S, "slow cpu")
    assert 0.35 < plan["scale"] < 0.45
    assert plan["predicted_minutes"] == pytest.approx(b.minutes, abs=0.05)
    steps = round(cfg.train.steps * budget.scale_for(b, SLOW_STEP_S))
    assert f"train.steps={steps}" in plan["overrides"]
    assert any(o.startswith("vae.steps=") for o in plan["overrides"])
    assert "clip.epochs" not in " ".join(plan["overrides"])  # not named in budget.scale
    # The EMA's window (1 / (1 - decay) steps) shrinks with the run; a decay scaled like a step count
    # (0.995 x 0.37) would average nothing.
    decay = next(float(o.split("=")[1]) for o in plan["overrides"] if o.startswith("train.ema_decay="))
    window = 1 / (1 - cfg.train.ema_decay) * budget.scale_for(b, SLOW_STEP_S)
    assert 1 / (1 - decay) == pytest.approx(window, rel=0.02)
    assert f"train.steps {cfg.train.steps} -> {steps}" in plan["summary"]


def test_a_cpu_as_fast_as_the_reference_trains_the_profile_unchanged_and_a_very_slow_one_says_it_overshoots():
    cfg = load_config("local")
    fast = budget.make_plan(cfg, cfg.budget.reference_step_s * 0.8, "fast cpu")
    assert fast["scale"] == 1.0 and fast["overrides"] == []
    crawl = budget.make_plan(cfg, cfg.budget.reference_step_s * 5, "crawling cpu")
    assert crawl["scale"] == cfg.budget.min_scale
    assert crawl["predicted_minutes"] > cfg.budget.minutes
    assert "over the budget" in crawl["summary"]


def test_the_plan_is_made_once_per_workdir_and_every_later_load_of_it_trains_the_planned_steps(tmp_path):
    # Catches a flow that calibrates again on a rerun (a new factor changes every training stage's
    # config, so they all run again), and stages that load the config without the plan.
    wd = str(tmp_path / "w")
    cfg = load_config("local", [], wd)
    plan = budget.ensure_plan(cfg, measure=lambda precision: SLOW_STEP_S, cpu="slow cpu")
    assert json.loads((tmp_path / "w" / BUDGET_PLAN).read_text()) == plan
    scaled = load_config("local", [], wd)
    full = cfg.train.steps
    assert scaled.train.steps == round(full * budget.scale_for(cfg.budget, SLOW_STEP_S)) < full
    assert scaled.clip.epochs == cfg.clip.epochs
    again = budget.ensure_plan(scaled, measure=lambda precision: 0.1, cpu="fast cpu")
    assert again == plan
    assert f"train.steps {full} -> " in closing_lines(scaled, "sqlite:///x.db", {})  # the run's last lines say so
    assert load_config("local", ["train.steps=9"], wd).train.steps == 9  # the user's override still wins
    assert load_config("test", [], wd).train.steps != scaled.train.steps  # a profile without a budget ignores it
    assert load_config("local", ["compute.use_gpu=true"], wd).train.steps == full  # a GPU run has no CPU budget


def test_a_remote_workdir_or_a_gpu_run_has_no_cpu_budget(tmp_path):
    assert budget.ensure_plan(load_config("local", [], "s3://bucket/w"), measure=lambda p: 9.0) is None
    cfg = load_config("local", ["compute.use_gpu=true"], str(tmp_path))
    assert budget.ensure_plan(cfg, measure=lambda p: 9.0) is None
    assert not (tmp_path / BUDGET_PLAN).exists()


def test_a_budget_naming_a_field_that_is_not_an_integer_step_count_is_refused_at_load():
    with pytest.raises(ConfigError, match="train.lr"):
        load_config("local", ["budget.scale=[train.steps, train.lr]"])
    with pytest.raises(ConfigError, match="vae.stepz"):
        load_config("local", ["budget.scale=[vae.stepz]"])


def test_a_corrupt_plan_file_is_a_one_line_error_naming_it(tmp_path):
    (tmp_path / BUDGET_PLAN).write_text("{not json")
    with pytest.raises(ConfigError, match="budget.json"):
        load_config("local", [], str(tmp_path))
