"""The time budget: each training stage times its own steps and trains as many as fit, once per config."""

import itertools
import json
from pathlib import Path

import pytest

from flows.report import closing_lines
from ldm import budget
from ldm.config import BudgetConfig, ConfigError, load_config

STEP_S = 0.25  # seconds of one step on a fast CPU (a fake clock: nothing here waits)
# The split these tests reason with, whatever the local profile's is today.
STAGES = "budget.stages={train-vae: {seconds: 250, after_s: 270}, train: {seconds: 500, after_s: 160}}"


def _budget(deadline=None, **stages) -> BudgetConfig:
    stages = stages or {"train-vae": {"seconds": 250, "after_s": 270}, "train": {"seconds": 500, "after_s": 160}}
    return BudgetConfig(minutes=18.5, stages=stages, deadline=deadline)


def test_a_stage_whose_steps_are_k_times_slower_trains_k_times_fewer_in_the_same_seconds(tmp_path):
    # Catches a count taken from anything but the stage's own measured step (a proxy, the config).
    cfg = load_config("local", [STAGES], str(tmp_path))
    full = cfg.train.steps
    fast = budget.decide(cfg.budget, "train", full, STEP_S / 2, now=0.0)
    ref = budget.decide(cfg.budget, "train", full, STEP_S, now=0.0)
    slow = budget.decide(cfg.budget, "train", full, 2 * STEP_S, now=0.0)
    assert ref["steps"] == 500 / STEP_S == 2000  # train's own 500 s, run alone
    assert slow["steps"] == pytest.approx(ref["steps"] / 2, abs=1)
    assert fast["steps"] == full  # never more than configured: 4,000 would fit
    assert slow["predicted_s"] <= 500


def test_in_a_flow_a_stage_gets_its_share_of_what_is_left_and_an_early_one_leaves_its_seconds_to_the_next():
    # Catches stages sized from the profile's fixed seconds while the flow runs late or early, and a
    # later stage that keeps none of the time an earlier one did not use.
    b = _budget(deadline=10_000.0)
    vae = budget.allowance_s(b, "train-vae", now=10_000.0 - 1020)  # 17 minutes left
    assert vae == pytest.approx((1020 - 270) * 250 / 750)
    on_time = budget.allowance_s(b, "train", now=10_000.0 - 1020 + vae + 100)
    early = budget.allowance_s(b, "train", now=10_000.0 - 1020 + vae / 2 + 100)
    assert on_time == pytest.approx(1020 - vae - 100 - 160)
    assert early - on_time == pytest.approx(vae / 2)  # the VAE's unused half goes to the UNet
    assert budget.allowance_s(b, "train", now=20_000.0) == 0  # past the deadline: nothing, not a negative count
    alone = _budget(deadline=None)
    assert budget.allowance_s(alone, "train-vae", now=123.0) == 250


def test_a_count_stays_between_the_floor_and_the_configured_steps():
    assert budget.steps_for(0.0, 1.0, 3000, 0.25) == 750
    assert budget.steps_for(1e9, 1.0, 3000, 0.25) == 3000
    assert budget.steps_for(100.0, 0.05, 3000, 0.25) == 2000
    assert budget.steps_for(0.0, 1.0, 3, 0.01) == 1  # a count is never 0 steps


def test_the_record_names_the_count_and_the_figures_it_came_from_to_their_precision():
    # Catches a record whose fields the manifest, MLflow and the closing lines read under other names,
    # or rounded past use (a step of 0.12 s shown as 0).
    b = _budget(deadline=1000.0)
    record = budget.decide(b, "train", 3400, 0.1111111, now=1000.0 - 160 - 100.5)
    assert record == {
        "steps": 904, "full_steps": 3400, "step_s": 0.11111, "seconds": 100.5, "predicted_s": 100.4,
        "cpu": budget.cpu_name(),
    }  # fmt: skip
    assert budget.decide(b, "train", 3400, 0.1, now=1000.0 - 160 - 333.36)["seconds"] == 333.4


def test_the_cpu_is_named_by_its_model_name_line_or_the_platform(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel\t\t: 17\nmodel name\t: AMD EPYC 9B14: engineering sample\nflags\t: avx2\n")
    assert budget.cpu_name(str(info)) == "AMD EPYC 9B14: engineering sample"
    assert budget.cpu_name(str(tmp_path / "missing"))  # no /proc: still a name, never empty
    if Path("/proc/cpuinfo").is_file():  # by default it reads this machine's
        assert budget.cpu_name() == budget.cpu_name("/proc/cpuinfo") != budget.cpu_name(str(tmp_path / "missing"))


def test_timing_leaves_out_the_warm_up_calls_and_means_the_rest():
    # Catches warm-up calls (allocation, kernel choice) counted in the mean, or a sum for a mean.
    ticks = itertools.count()
    slow_first = iter([50.0, 50.0, 50.0] + [2.0] * 12)
    now = [0.0]

    def step():
        now[0] += next(slow_first)

    assert budget.time_steps(step, steps=12, warmup=3, clock=lambda: now[0] + 0 * next(ticks)) == 2.0


def test_the_count_is_recorded_once_per_config_and_a_rerun_reuses_it_without_timing(tmp_path):
    # Catches a rerun or resumed run that times its steps again and trains a different count (another
    # model from the same config), and a record shared across configs.
    cfg = load_config("local", [STAGES], str(tmp_path))
    first = budget.sized(cfg, "train-vae", "hash-a", cfg.vae.steps, measure=lambda: STEP_S, now=lambda: 0.0)
    assert first["steps"] == 250 / STEP_S
    on_disk = json.loads((tmp_path / budget.BUDGET_FILE).read_text())
    assert on_disk["train-vae"]["hash-a"]["steps"] == first["steps"]

    def must_not_time() -> float:
        raise AssertionError("a recorded count was timed again")

    again = budget.sized(cfg, "train-vae", "hash-a", cfg.vae.steps, measure=must_not_time, now=lambda: 0.0)
    assert again["steps"] == first["steps"] and again["reused"]
    other = budget.sized(cfg, "train-vae", "hash-b", cfg.vae.steps, measure=lambda: STEP_S / 2, now=lambda: 0.0)
    assert other["steps"] == 2000  # another config is timed for itself
    train = budget.sized(cfg, "train", "hash-a", cfg.train.steps, measure=lambda: STEP_S, now=lambda: 0.0)
    assert train["steps"] == 2000
    both = json.loads((tmp_path / budget.BUDGET_FILE).read_text())  # one stage's record never drops another's
    assert both["train"]["hash-a"]["steps"] == 2000 and both["train-vae"]["hash-a"]["steps"] == 1000


def test_in_a_flow_the_count_comes_from_the_clock_at_the_moment_the_stage_is_sized(tmp_path):
    # Catches a count sized without the clock (as if run alone) while a flow's deadline is set.
    cfg = load_config("local", [STAGES, "budget.deadline=5000"], str(tmp_path))
    late = budget.sized(cfg, "train", "h", cfg.train.steps, measure=lambda: STEP_S, now=lambda: 5000.0 - 160 - 300)
    assert late["steps"] == 300 / STEP_S and late["seconds"] == 300


def test_no_budget_on_a_gpu_for_an_unnamed_stage_or_a_profile_without_one(tmp_path):
    gpu = load_config("local", ["compute.use_gpu=true"], str(tmp_path))
    assert budget.sized(gpu, "train", "h", 10, measure=lambda: 9.0) is None
    vae_only = load_config("local", ["budget.stages={train-vae: {seconds: 1, after_s: 0}}"], str(tmp_path))
    assert budget.applies(vae_only, "train-vae") and not budget.applies(vae_only, "train")
    assert budget.sized(load_config("test", [], str(tmp_path)), "train", "h", 10, measure=lambda: 9.0) is None
    assert not (tmp_path / budget.BUDGET_FILE).exists()


def test_a_shorter_run_shrinks_its_warm_up_and_ema_window_in_proportion():
    # Catches an EMA decay scaled like a step count (0.995 x 0.37 averages nothing) and a warm-up
    # left at the full run's length (a third of a short run at a low LR).
    tc = load_config("local").train
    short = budget.scaled_train(tc, tc.steps // 4)
    assert short.steps == tc.steps // 4
    assert short.warmup_steps == round(tc.warmup_steps / 4)
    assert 1 / (1 - short.ema_decay) == pytest.approx(1 / (1 - tc.ema_decay) / 4, rel=0.02)
    assert short.lr == tc.lr
    assert budget.scaled_train(tc, tc.steps) == tc
    fine = tc.model_copy(update={"ema_decay": 0.99995})  # unchanged at its full count, not rounded to 1 (frozen)
    assert budget.scaled_train(fine, tc.steps).ema_decay == 0.99995
    assert budget.scaled_train(tc, tc.steps // 1000).warmup_steps == 1  # a warm-up never rounds to none
    no_warmup = budget.scaled_train(tc.model_copy(update={"warmup_steps": 0, "ema_decay": 0.0}), 10)
    assert no_warmup.warmup_steps == 0 and no_warmup.ema_decay == 0.0


def test_the_flow_clock_starts_once_and_only_where_a_budget_applies():
    cfg = load_config("local")
    (override,) = budget.clock(cfg, started=1000.0)
    assert override == f"budget.deadline={1000.0 + cfg.budget.minutes * 60:.1f}"
    timed = load_config("local", [override])
    assert timed.budget.deadline == 1000.0 + cfg.budget.minutes * 60
    assert budget.clock(timed, started=5000.0) == []  # a clock already running is kept (deployment after CLI)
    assert budget.clock(load_config("test"), 0.0) == []
    assert budget.clock(load_config("local", ["compute.use_gpu=true"]), 0.0) == []


def test_the_closing_lines_say_which_stage_the_budget_shortened_and_why(tmp_path):
    cfg = load_config("local", [], str(tmp_path))
    short = {"steps": 1200, "full_steps": 3400, "step_s": 0.31, "seconds": 372.0, "cpu": "AMD EPYC"}
    whole = {**short, "steps": 3000, "full_steps": 3000}
    text = closing_lines(cfg, "sqlite:///x.db", {"train-vae": {"budget": whole}, "train": {"budget": short}})
    assert "budget: train trained 1,200 of 3,400 steps: 0.310 s a step measured on AMD EPYC" in text
    assert "train-vae trained" not in text
    assert "budget" not in closing_lines(cfg, "sqlite:///x.db", {"train": {"budget": None}})


def test_a_budget_naming_a_stage_that_cannot_size_itself_is_refused_at_load():
    with pytest.raises(ConfigError, match="budget.stages.train-clip"):
        load_config("local", ["budget.stages={train-clip: {seconds: 1, after_s: 0}}"])
    with pytest.raises(ConfigError, match="budget.stages.train.seconds"):
        load_config("local", ["budget.stages.train.seconds=0"])
