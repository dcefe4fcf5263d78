"""`ldm plan`: every registry stage with its output folder and resources, and on a GPU profile the hours of
ingest, filter, precompute, train and evaluate at the source's row count, touching nothing.

Bugs this catches: a stage added to the registry but missing from the plan (or a plan that crashes on it), an
output folder that differs from the one the stage writes (LAYOUT), a plan that creates the work directory, an
MLflow store or a Ray session on its way, or imports torch / ray (flows/ must not), an hour figure presented
without its source or invented for a stage nothing was measured for, and hours off by a unit, a row count or
a node count (recomputed here from the config).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from flows.endpoints import RAY_STAGES
from flows.plan import INGEST_NODES, PRICED, figure, plan
from flows.registry import STAGES
from ldm.config import load_config, phase_configs
from ldm.stage import Workdir

ROOT = Path(__file__).resolve().parents[2]
PROBE = """
import sys
from flows.cli import main
code = main(sys.argv[1:])
heavy = sorted(m for m in ("torch", "ray", "mlflow", "prefect", "s3fs") if m in sys.modules)
print("IMPORTED:", ",".join(heavy) or "-")
sys.exit(code)
"""


def run_plan(tmp_path: Path, *args: str) -> str:
    """`ldm plan ARGS` in a fresh process whose cwd, HOME and TMPDIR are empty folders under tmp_path; their
    being still empty afterwards is checked here. S3 points at a closed loopback port: any bucket access fails."""
    dirs = {name: tmp_path / name for name in ("cwd", "home", "tmp")}
    for d in dirs.values():
        d.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HOME": str(dirs["home"]), "TMPDIR": str(dirs["tmp"])}
    env["AWS_ENDPOINT_URL"] = "http://127.0.0.1:9"
    done = subprocess.run([sys.executable, "-c", PROBE, "plan", *args], cwd=dirs["cwd"], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    for name, d in dirs.items():
        assert not any(d.rglob("*")), f"ldm plan wrote into {name}: {sorted(d.rglob('*'))}"
    assert "IMPORTED: -" in done.stdout, done.stdout.splitlines()[-1]
    return done.stdout


def test_prod_plan_lists_every_stage_and_touches_nothing(tmp_path):
    """The prod plan names every registry stage in order with the folder it writes, and estimates training's
    GPU-hours from the measured figure (else the labelled anchor) while the stages without a figure say so."""
    out = run_plan(tmp_path, "--profile", "prod")
    cfg = load_config("prod", [], None)
    wd = Workdir.of(cfg)
    positions = []
    for stage in STAGES:
        header = next(i for i, line in enumerate(out.splitlines()) if line.endswith(f". {stage.name}"))
        block = out.splitlines()[header : header + 4]
        assert f"   output:    {wd.output(stage.name)}" in block, block
        positions.append(header)
    assert positions == sorted(positions)
    assert "671 H200-hours" in out  # 550,000 steps x 2,048 images / 466.1 images/s (measured) / 3600
    assert "measured: bench/gpu_train.py" in out
    # Without the measured setting (compiled, no recomputation) the plan falls back to the labelled anchor.
    (tmp_path / "eager").mkdir()
    eager = run_plan(tmp_path / "eager", "--profile", "prod", "--set", "train.compile=false")
    assert "2,284 A100-hours" in eager and "external anchor" in eager and "MosaicML" in eager
    for stage in ("precompute", "evaluate"):
        assert re.search(rf"^  {stage}: .*: no measured figure", out, re.M), out
    assert "32 workers x 1 GPU" in out
    # Every stage whose work grows with the rows is a Ray job whose driver asks for the CPU that keeps it off
    # the 0-CPU head; none is described as running in the flow's pod.
    for stage in RAY_STAGES:
        block = _block(out, stage)
        assert "flow's process" not in block and "job:       a Ray job whose driver asks for 1 CPU" in block, block
    assert "Ray tasks:" in _block(out, "ingest") and "Ray Data: scorer actors" in _block(out, "filter")


def _block(out: str, stage: str) -> str:
    """The plan's lines for one stage: its header to the next blank line or header."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.endswith(f". {stage}"))
    end = next(i for i in range(start + 1, len(lines)) if not lines[i].startswith("   "))
    return "\n".join(lines[start:end])


def test_local_plan_on_a_local_workdir_creates_nothing(tmp_path):
    """A file:// work directory that does not exist yet stays absent; a CPU profile claims no GPU-hours."""
    workdir = tmp_path / "w"
    out = run_plan(tmp_path, "--profile", "local", "--workdir", str(workdir))
    assert not workdir.exists()
    wd = Workdir.of(load_config("local", [], str(workdir)))
    for stage in STAGES:
        assert f". {stage.name}\n" in out and f"   output:    {wd.output(stage.name)}\n" in out
    assert "none: this profile runs on CPUs" in out


def _line(out: str, stage: str) -> str:
    return next(line for line in out.splitlines() if line.startswith(f"  {stage}: "))


def _hours(line: str) -> tuple[str, str]:
    """(unit-hours, wall hours) as the line prints them."""
    found = re.search(r"= ([\d,]+) [^=;]*-hours; ~([\d,]+) h at linear scaling", line)
    assert found, line
    return found.group(1), found.group(2)


def test_prod_hours_follow_rows_throughput_and_nodes():
    """The five priced stages, at relaion2B-en-research-safe's published 2.1B rows: ingest's and train's hours
    recomputed here from rows (or steps x batch), the table's figure per second and the nodes or GPUs the
    config gives them; the stages without a figure name their work and GPUs and say why there is no figure.

    Bugs caught: a figure read per minute or per hour as per second (hours off 60x or 3600x); the wrong row
    count (a source path not matched to its list's published count, or the synthetic source's num_samples used
    for a LAION list); wall hours not divided by the nodes, or divided by compute.num_workers for ingest's CPU
    nodes; a GPU count that ignores compute.num_workers or <stage>.actors; evaluate's images counted without
    the untrained baseline point; one of the five stages missing from the estimates."""
    cfg = load_config("prod", ["compute.num_workers=16", "evaluate.actors=8"], None)
    out = plan(cfg, "prod")
    rows = 2_100_000_000  # relaion2B-en-research-safe on Hugging Face (rounded); prod names that list
    assert "relaion2B-en-research-safe" in cfg.source.paths[0]
    assert f"Hours (estimated) at {rows:,} rows; row count: published, not counted here" in out
    assert [line.split(":")[0].strip() for line in out.split("Hours (estimated)")[1].splitlines()[1:]] == list(PRICED)

    ingest = figure("ingest", cfg)
    assert (ingest.per_s, ingest.unit) == (1000.0, "16-core node") and "published, not measured here" in ingest.source
    node_hours = rows / 1000.0 / 3600  # 583: about three weeks on one node, as the issue says
    line = _line(out, "ingest")
    assert _hours(line) == (f"{node_hours:,.0f}", f"{node_hours / INGEST_NODES:,.0f}"), line
    assert f"on {INGEST_NODES} nodes" in line and ingest.source in line and line.startswith(f"  ingest: {rows:,} rows")

    first = phase_configs(cfg)[0]  # prod's 256 px phase, the one a figure was measured for; the 512 px one has none
    train = figure("train", first)
    gpu_hours = first.train.steps * first.train.batch_size / train.per_s / 3600
    line = _line(out, "train")
    assert line.startswith("  train: sd2-base-256 at 256 px: ") and "; then sd2-base-512 at 512 px: " in line, line
    assert line.endswith("no measured figure for this UNet size and resolution (docs/PERFORMANCE.md: CPU figures only)")
    assert _hours(line) == (f"{gpu_hours:,.0f}", f"{gpu_hours / 16:,.0f}"), line  # 671 H200-hours, 42 h on 16
    assert "on 16 GPUs (compute.num_workers)" in line and train.source in line

    for stage in ("filter", "precompute"):
        line = _line(out, stage)
        assert f"at most {rows:,}" in line and "on 16 GPUs" in line and "-hours" not in line, line
    e = cfg.evaluate
    points = len(e.guidance) * len(e.steps) * len(e.samplers) * len(e.checkpoints) + 1
    line = _line(out, "evaluate")
    assert f"{points} points" in line and f"{points * e.prompt_count:,} images" in line, line
    assert "on 8 GPUs (evaluate.actors)" in line and "no measured figure" in line and "-hours" not in line


def test_a_list_of_unknown_length_is_not_priced():
    """A parquet list the plan knows no count for: the data stages say so and name the fix; training, whose
    work the config fixes, is still priced.

    Bug caught: a default row count (or the synthetic num_samples) silently standing in for an unknown list."""
    cfg = load_config("prod", ["source.paths=[s3://bucket/my-list/]"], None)
    out = plan(cfg, "prod")
    assert "Hours (estimated) at an unknown row count:" in out
    for stage in ("ingest", "filter", "precompute"):
        assert (
            _line(out, stage) == f"  {stage}: no row count for s3://bucket/my-list/: add its published count "
            "to PUBLISHED_ROWS"
        )
    assert "671 H200-hours" in _line(out, "train")
