"""The CLI's error battery: every failure a user can cause ends as ONE line on stderr naming the stage and
the file, field, bucket or address at fault, with a non-zero exit (2 config, 1 stage); --debug adds the traceback.

The bug each case catches: the failure escaping as a traceback (or a line that names nothing), which is
what every one of these did before the CLI had one error path.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from flows.cli import main
from flows.registry import run as run_stage
from ldm.aesthetic.model import AestheticMLP
from ldm.io.shards import read_shard, write_shard
from tests.helpers import free_port, make_config

REPO = Path(__file__).resolve().parents[2]


def cli(capsys, workdir, *args: str) -> tuple[int, str]:
    """Run `ldm stage ...` in-process on the test profile; (exit status, stderr)."""
    capsys.readouterr()
    code = main(["stage", *args, "--profile", "test", "--workdir", str(workdir)])
    return code, capsys.readouterr().err


def one_line(err: str) -> str:
    """The single stderr line; fails on a traceback or on more than one line."""
    assert "Traceback" not in err, err
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1, err
    return lines[0]


def copy_outputs(src: str, dst: Path, *folders: str) -> Path:
    """A fresh workdir holding copies of some stage outputs of a session fixture's workdir."""
    for f in folders:
        shutil.copytree(Path(src) / f, dst / f)
    return dst


def test_missing_clip_weights_names_the_field_and_debug_shows_the_traceback(tmp_path, capsys):
    args = ("train-clip", "--set", "clip.arch=ViT-B-32", "--set", "clip.weights=/nope.pth")
    code, err = cli(capsys, tmp_path, *args)
    line = one_line(err)
    assert code == 1 and line.startswith("ldm: train-clip: ") and "clip.weights" in line and "/nope.pth" in line
    code, err = cli(capsys, tmp_path, *args, "--debug")
    assert code == 1 and "Traceback" in err and err.strip().splitlines()[-1] == line


def test_missing_aesthetic_weights_names_the_file(components, tmp_path, capsys):
    wd = copy_outputs(components[0].workdir, tmp_path, "raw", "models/clip")
    code, err = cli(capsys, wd, "train-aesthetic", "--set", "aesthetic.weights=/nope.pth")
    line = one_line(err)
    assert code == 1 and "ldm: train-aesthetic:" in line and "aesthetic.weights" in line and "/nope.pth" in line


def test_aesthetic_mlp_of_another_width_is_refused_at_stage_start(components, tmp_path, capsys):
    wd = copy_outputs(components[0].workdir, tmp_path, "raw", "models/clip")
    weights = tmp_path / "mlp64.pth"
    torch.save(AestheticMLP(64).state_dict(), weights)  # the test CLIP embeds in 128-d
    code, err = cli(capsys, wd, "train-aesthetic", "--set", f"aesthetic.weights={weights}")
    line = one_line(err)
    assert code == 1 and str(weights) in line and "input width 128" in line


def test_resolution_the_clip_cannot_take_is_refused_at_config_load(tmp_path, capsys):
    code, err = cli(capsys, tmp_path, "ingest", "--set", "ingest.resolution=48")
    line = one_line(err)
    assert code == 2 and "ingest.resolution 48" in line and "clip.vision=resnet" in line
    assert not any(tmp_path.iterdir())  # refused before ingest wrote anything
    code, err = cli(capsys, tmp_path, "ingest", "--set", "ingest.resolution=36", "--set", "clip.vision=vit")
    assert code == 2 and "clip.patch_size is 8" in one_line(err)


def test_undecodable_sample_in_filter_names_shard_and_key(components, tmp_path, capsys):
    wd = copy_outputs(components[0].workdir, tmp_path, "raw", "models/clip", "models/aesthetic")
    shard = sorted((wd / "raw" / "shards").glob("*.tar"))[0]
    samples = read_shard(str(shard))
    samples[1]["jpg"] = b"\xff\xd8 not a jpeg at all"  # a valid tar holding garbage image bytes
    write_shard(str(shard), samples)
    code, err = cli(capsys, wd, "filter")
    line = one_line(err)
    assert code == 1 and line.startswith("ldm: filter: ") and shard.name in line and samples[1]["key"] in line


@pytest.fixture(scope="module")
def precompute_ready(components, tmp_path_factory):
    """A workdir with every input of precompute (train-vae for 2 steps): (workdir, the --set that goes with it)."""
    wd = copy_outputs(
        components[0].workdir, tmp_path_factory.mktemp("pre"), "raw", "models/clip", "models/aesthetic", "filtered"
    )
    run_stage("train-vae", make_config(wd, "vae.steps=2"))
    return wd, ("--set", "vae.steps=2")


def test_unreachable_ray_address_names_the_address(precompute_ready, capsys, monkeypatch):
    import ray

    ray.shutdown()  # a cluster another test started would be reused instead
    wd, sets = precompute_ready
    address = f"127.0.0.1:{free_port()}"
    monkeypatch.setenv("RAY_ADDRESS", address)
    code, err = cli(capsys, wd, "precompute", *sets)
    line = one_line(err)
    assert code == 1 and line.startswith("ldm: precompute: ") and address in line and "RAY_ADDRESS" in line


def test_corrupt_shard_in_precompute_is_unwrapped_from_ray(precompute_ready, tmp_path, capsys):
    wd, sets = precompute_ready
    wd = copy_outputs(str(wd), tmp_path, "raw", "models", "filtered")
    shard = sorted((wd / "filtered" / "shards").glob("*.tar"))[0]
    shard.write_bytes(shard.read_bytes()[:1500])  # cut mid-member
    code, err = cli(capsys, wd, "precompute", *sets)
    line = one_line(err)
    assert code == 1 and line.startswith("ldm: precompute: filtered shard") and shard.name in line
    assert "RayTaskError" not in line and "filter" in line


def test_truncated_upstream_manifest_names_the_file(ingested, tmp_path, capsys):
    wd = copy_outputs(ingested[0].workdir, tmp_path, "raw")
    manifest = wd / "raw" / "manifest.json"
    manifest.write_text(manifest.read_text()[:40])
    code, err = cli(capsys, wd, "train-clip")
    line = one_line(err)
    assert code == 1 and "raw/manifest.json" in line and "rerun the ingest stage" in line


def test_non_string_url_column_names_the_column(tmp_path, capsys):
    src = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"URL": [1, 2, 3], "TEXT": ["a", "b", "c"]}), src)
    code, err = cli(capsys, tmp_path / "w", "ingest", "--set", "source.kind=parquet", "--set", f"source.paths=[{src}]")
    line = one_line(err)
    assert code == 1 and line.startswith("ldm: ingest: ") and "'URL'" in line and "ingest.columns.url" in line


def test_missing_bucket_names_the_bucket(s3_server, capsys):
    code, err = cli(capsys, "s3://no-such-bucket/x", "train-clip")
    line = one_line(err)
    assert code == 1 and "s3://no-such-bucket" in line and "does not exist" in line


def test_absent_credentials_name_the_bucket_and_the_variables(s3_bucket, tmp_path):
    """A fresh process (s3fs caches clients with their credentials), as the user runs it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env |= {
        "PYTHONPATH": str(REPO),
        "AWS_ENDPOINT_URL": os.environ["AWS_ENDPOINT_URL"],
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_EC2_METADATA_DISABLED": "true",  # never ask an instance-metadata address for credentials
    }
    argv = ["stage", "train-clip", "--profile", "test", "--workdir", f"{s3_bucket}/x"]
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", *argv], env=env, capture_output=True, text=True, timeout=120
    )
    line = one_line(proc.stderr)
    assert proc.returncode == 1 and s3_bucket in line and "AWS_ACCESS_KEY_ID" in line


# The `ldm` console script exactly as pip installs it: the entry point declared in pyproject, loaded and called.
LDM_SCRIPT = (
    "import sys; from importlib.metadata import entry_points; "
    "(ep,) = entry_points(group='console_scripts', name='ldm'); sys.exit(ep.load()())"
)


def test_the_console_script_exits_1_on_a_stage_error_and_2_on_a_config_error(tmp_path):
    """Bugs caught: `main()`'s return value dropped by the entry point (the shell sees 0 after a failed stage, so
    a script or CI step carries on), or an error escaping as a traceback from the installed `ldm` command."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    w = tmp_path / "w"
    stage = subprocess.run(
        [sys.executable, "-c", LDM_SCRIPT, "stage", "ingest", "--profile", "test", "--workdir", str(w),
         "--set", "source.kind=parquet", "--set", f"source.paths=[{tmp_path}/nope.parquet]"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert stage.returncode == 1
    assert one_line(stage.stderr) == f"ldm: ingest: input file {tmp_path}/nope.parquet does not exist"
    config = subprocess.run(
        [sys.executable, "-c", LDM_SCRIPT, "stage", "ingest", "--profile", "test", "--workdir", str(w),
         "--set", "ingest.threads=many"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert config.returncode == 2 and one_line(config.stderr).startswith("ldm: config error: ingest.threads: ")
    assert not w.exists()


def test_generate_with_a_missing_prompts_file_names_the_file(tmp_path, capsys):
    # Bug caught: open() raising through the CLI as a traceback (it did).
    missing = tmp_path / "prompts.txt"
    code = main(["generate", "--model", str(tmp_path), "--prompts-file", str(missing)])
    line = one_line(capsys.readouterr().err)
    assert code == 2 and str(missing) in line and "No such file" in line
