"""`ldm plan`: every registry stage with its output folder, resources and GPU-hours, touching nothing.

Bugs this catches: a stage added to the registry but missing from the plan (or a plan that crashes on it), an
output folder that differs from the one the stage writes (LAYOUT), a plan that creates the work directory, an
MLflow store or a Ray session on its way, or imports torch / ray (flows/ must not), and a GPU-hour figure
presented without its source or invented for a stage nothing was measured for.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from flows.registry import STAGES
from ldm.config import load_config
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
    GPU-hours from the measured figure (else the labelled anchor) while the stages without a GPU figure say so."""
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
    assert "precompute: no measured figure" in out and "evaluate: no measured figure" in out
    assert "32 workers x 1 GPU" in out


def test_local_plan_on_a_local_workdir_creates_nothing(tmp_path):
    """A file:// work directory that does not exist yet stays absent; a CPU profile claims no GPU-hours."""
    workdir = tmp_path / "w"
    out = run_plan(tmp_path, "--profile", "local", "--workdir", str(workdir))
    assert not workdir.exists()
    wd = Workdir.of(load_config("local", [], str(workdir)))
    for stage in STAGES:
        assert f". {stage.name}\n" in out and f"   output:    {wd.output(stage.name)}\n" in out
    assert "none: this profile runs on CPUs" in out
