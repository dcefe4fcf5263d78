"""Library chatter goes to the stage's log file; the terminal keeps the stage's summary and the log's path.

Bug this catches: Ray Data's progress blocks and execution plans (78 of them in the demo's precompute), Ray's
start-up lines, MLflow's and alembic's store messages or a library's retry warnings printed on the terminal
between the stage's progress bar and its summary; a log whose path the summary names but that does not exist
or lacks the chatter; loggers left pointing at a finished stage's file.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = """
import logging, sys
from ldm.stage import Stage, run_stage, stage_log_file
from tests.helpers import make_config
stage = Stage(name="precompute", fields=("seed",), work="tests.ldm.chatter_stage:work",
              summary="tests.ldm.chatter_stage:summary")
run_stage(stage, make_config(sys.argv[1]))
assert stage_log_file() is None
assert not any(isinstance(h, logging.FileHandler) for n in ("", "ray", "ray.data", "mlflow")
               for h in logging.getLogger(n).handlers), "a logger still writes to the stage's log"
"""
CHATTER = ("Dataset", "Execution plan", "ray.data", "Started a local Ray instance", "alembic", "Retrying", "%|")


def test_library_chatter_goes_to_the_stage_log(tmp_path):
    """One real stage (Ray Data on a local Ray cluster, an MLflow SQLite run) through run_stage in a fresh
    process: its terminal holds the summary and the log's path, the log holds the chatter."""
    workdir = tmp_path / "w"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_DATA_DISABLE_PROGRESS_BARS", None)
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(workdir)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    terminal = done.stdout + done.stderr
    assert done.returncode == 0, terminal[-3000:]
    log = workdir / "logs" / "precompute.log"
    assert "chatter summary: total 3998000" in done.stdout
    assert f"library logs: file://{log}" in done.stdout
    leaked = [line for line in terminal.splitlines() if any(word in line for word in CHATTER)]
    assert not leaked, leaked[:5]
    text = log.read_text()
    for word in ("ray.data", "Dataset", "Retrying (chatter from urllib3)"):
        assert word in text, f"{word!r} not in {log}"
