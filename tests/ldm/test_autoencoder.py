"""train-vae: latent shapes, training beats the untrained model, diffusers round trips, the prod path, skipping."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file

from flows.registry import run as run_stage
from ldm.autoencoder import build_vae, load_vae, psnr, train_vae
from ldm.autoencoder.stage import HELDOUT_N
from ldm.config import VaeConfig
from ldm.io import storage
from ldm.io.manifest import StageError
from ldm.synthetic import heldout_set
from tests.helpers import make_config

SMALL = ["vae.steps=150", "vae.block_channels=[16,32,32]", "vae.batch_size=16", "vae.lr=2e-3"]
WEIGHTS = "diffusion_pytorch_model.safetensors"


def make_filtered_standin(raw_workdir: str, workdir: Path, corrupt: bool = False) -> None:
    """Stand-in for the filter stage: W/filtered/shards = the raw shards, and a manifest with a config_hash."""
    raw = Path(storage.normalize(raw_workdir).removeprefix("file://")) / "raw" / "shards"
    shards = workdir / "filtered" / "shards"
    shards.mkdir(parents=True)
    for tar in sorted(raw.glob("*.tar")):
        shutil.copy(tar, shards / tar.name)
    if corrupt:  # a shard cut off mid-member, as a killed writer leaves it
        data = (shards / "00000.tar").read_bytes()
        (shards / "99999.tar").write_bytes(data[: len(data) // 2 + 100])
    (workdir / "filtered" / "manifest.json").write_text(json.dumps({"config_hash": "standin-" + workdir.name}))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tracking(tmp_path_factory) -> str:
    """One MLflow store for the module: creating a SQLite store costs seconds of migrations."""
    return "tracking.uri=sqlite:///" + str(tmp_path_factory.mktemp("mlflow") / "mlflow.db")


@pytest.fixture(scope="module")
def trained(ingested, tracking, tmp_path_factory):
    """One real train-vae run on the test profile's stand-in filtered shards: (cfg, manifest)."""
    raw_cfg, _ = ingested
    workdir = tmp_path_factory.mktemp("vae")
    make_filtered_standin(raw_cfg.workdir, workdir)
    cfg = make_config(workdir, *SMALL, tracking)
    return cfg, run_stage("train-vae", cfg)


def tiny_vae(channels: tuple[int, ...] = (8, 16)) -> AutoencoderKL:
    """A small AutoencoderKL like one a user could hand the prod path."""
    torch.manual_seed(0)
    n = len(channels)
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=channels,
        norm_num_groups=8,
        sample_size=16,
        scaling_factor=0.3,
    )


@pytest.mark.parametrize(
    ("res", "channels", "f"), [(64, [32, 64, 64], 4), (32, [16, 32, 32], 4), (64, [8, 8, 8, 8], 8)]
)
def test_latent_shape_is_channels_by_res_over_f(res, channels, f):
    cfg = VaeConfig(block_channels=channels, downsample=f)
    vae = build_vae(cfg, res, seed=0)
    with torch.no_grad():
        z = vae.encode(torch.zeros(2, 3, res, res)).latent_dist.mode()
    assert tuple(z.shape) == (2, 4, res // f, res // f)


def test_training_is_deterministic_for_a_seed():
    images = np.random.default_rng(0).integers(0, 256, (12, 16, 16, 3), dtype=np.uint8)
    cfg = VaeConfig(block_channels=[8, 8, 8], steps=4, batch_size=4)
    a, ha = train_vae(images, cfg, seed=3, progress=False)
    b, hb = train_vae(images, cfg, seed=3, progress=False)
    assert ha["loss"] == hb["loss"]
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_edge_term_charges_an_error_that_changes_across_pixels_not_a_uniform_one():
    """The edge term is the L1 of the error's x and y pixel differences, added at edge_weight.

    Bugs caught: differences of the image instead of the error (a perfect reconstruction of an edge would
    still pay), a term summed instead of averaged, one axis only, the weight not applied.
    """
    from ldm.autoencoder.train import loss_name, reconstruction_loss

    x = torch.zeros(1, 1, 2, 2)
    x[..., :, 1] = 1.0  # a vertical edge, reconstructed exactly below: no edge cost
    cfg = VaeConfig(edge_weight=2.0)
    assert reconstruction_loss(x.clone(), x, cfg).item() == 0.0
    assert reconstruction_loss(x + 0.5, x, cfg).item() == pytest.approx(0.5)  # uniform error: the L1 only
    spot = x.clone()
    spot[0, 0, 0, 0] += 1.0  # one pixel off by 1: L1 0.25; |dx| mean 0.5, |dy| mean 0.5
    assert reconstruction_loss(spot, x, cfg).item() == pytest.approx(0.25 + 2.0 * (0.5 + 0.5))
    assert reconstruction_loss(spot, x, VaeConfig()).item() == pytest.approx(0.25)
    assert loss_name(cfg) == "l1+edge+kl"


def test_stage_trains_past_the_untrained_model(trained):
    cfg, m = trained
    metrics = m["metrics"]
    assert metrics["psnr"] > metrics["psnr_untrained"] + 5, metrics
    assert m["loss"]["name"] == "l1+kl" and "LPIPS not used" in m["loss"]["lpips"]
    assert m["latent_shape"] == [4, 8, 8]
    assert m["train_images"] == 120 and m["skipped_shards"] == 0
    out = Path(storage.normalize(cfg.workdir).removeprefix("file://")) / "models" / "vae"
    assert {"config.json", WEIGHTS, "reconstructions.png", "manifest.json"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "config.json").read_text())["scaling_factor"] == pytest.approx(
        metrics["scale_factor"], abs=1e-4
    )


def test_stage_logs_to_mlflow(trained, tmp_path):
    """Read back from the SQLite store through MlflowClient and compared with the files the stage wrote.

    Bugs caught: the manifest's run id pointing at another run (or a run left RUNNING); the untrained PSNR or a
    pre-scale value logged under psnr/scale_factor (compared with the manifest file and the VAE's config.json);
    params from the profile instead of the run's config; a loss curve that is not the training's (its first
    point is step 0, its points stop at the last step); an artefact that is not the grid on disk.
    """
    from mlflow import MlflowClient

    cfg, _ = trained
    out = Path(storage.normalize(cfg.workdir).removeprefix("file://")) / "models" / "vae"
    manifest = json.loads((out / "manifest.json").read_text())
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    run = client.get_run(manifest["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "train-vae"
    logged = run.data.metrics
    for key, value in manifest["metrics"].items():
        assert logged[key] == pytest.approx(value, abs=1e-4), key
    assert logged["scale_factor"] == pytest.approx(json.loads((out / "config.json").read_text())["scaling_factor"])
    assert logged["psnr"] > logged["psnr_untrained"]
    vae_config = manifest["config"]["vae"]
    assert run.data.params["vae.steps"] == str(vae_config["steps"]) == "150"
    assert run.data.params["vae.lr"] == str(vae_config["lr"]) and run.data.params["seed"] == str(
        manifest["config"]["seed"]
    )
    history = client.get_metric_history(run.info.run_id, "train_rec")
    steps = sorted(h.step for h in history)
    assert steps[0] == 0 and steps[-1] < vae_config["steps"] and len(steps) > 10
    grid = client.download_artifacts(run.info.run_id, "reconstructions.png", str(tmp_path))
    assert Path(grid).read_bytes() == (out / "reconstructions.png").read_bytes()


def test_load_vae_reads_back_the_trained_model(trained):
    cfg, m = trained
    vae = load_vae(cfg)
    assert vae.config.scaling_factor == pytest.approx(m["metrics"]["scale_factor"], abs=1e-4)  # metrics are rounded
    heldout = heldout_set(cfg.source, HELDOUT_N, cfg.ingest.resolution)
    assert psnr(vae, heldout.images) == pytest.approx(m["metrics"]["psnr"], abs=1e-3)


def test_stage_skips_when_up_to_date_and_refuses_another_config(trained, capsys):
    cfg, m = trained
    weights = Path(storage.normalize(cfg.workdir).removeprefix("file://")) / "models" / "vae" / WEIGHTS
    before = weights.stat().st_mtime_ns
    assert run_stage("train-vae", cfg) == m
    assert "up to date" in capsys.readouterr().out
    assert weights.stat().st_mtime_ns == before
    other = make_config(cfg.workdir, *SMALL, "vae.kl_weight=1e-5", f"tracking.uri={cfg.tracking.uri}")
    with pytest.raises(StageError, match="different config"):
        run_stage("train-vae", other)
    with pytest.raises(StageError, match=r"made with vae\.kl_weight=1e-06, this config has vae\.kl_weight=1e-05"):
        load_vae(other)


def test_a_budgeted_vae_trains_its_timed_count_and_a_rerun_of_the_config_reuses_it(trained, tmp_path):
    """A budget too short for 150 steps gets the floor (30); the output lost, the stage runs again with
    seconds for all 150 and still trains 30.

    Bugs caught: the count not applied to the training (150 steps run), not recorded in the manifest, or
    timed again on a rerun of the same config (another model from the same config).
    """
    from ldm.budget import BUDGET_FILE

    cfg, _ = trained
    workdir = tmp_path / "w"
    shutil.copytree(Path(storage.normalize(cfg.workdir).removeprefix("file://")) / "filtered", workdir / "filtered")
    tight = "budget={minutes: 1, min_scale: 0.2, stages: {train-vae: {seconds: 0.001, after_s: 0}}}"
    m = run_stage("train-vae", make_config(workdir, *SMALL, tight, f"tracking.uri={cfg.tracking.uri}"))
    assert m["steps"] == 30 and m["budget"]["full_steps"] == 150 and m["budget"]["step_s"] > 0
    assert m["config"]["vae"]["steps"] == 150  # the identity is the configured recipe, the count its record
    assert json.loads((workdir / BUDGET_FILE).read_text())["train-vae"][m["config_hash"]]["steps"] == 30
    shutil.rmtree(workdir / "models")
    ample = tight.replace("seconds: 0.001", "seconds: 100000")
    again = run_stage("train-vae", make_config(workdir, *SMALL, ample, f"tracking.uri={cfg.tracking.uri}"))
    assert again["steps"] == 30 and again["budget"]["reused"]
    assert again["metrics"]["psnr"] == pytest.approx(m["metrics"]["psnr"], abs=1e-4)  # the same model again


def test_save_pretrained_round_trip_keeps_scale_and_outputs(tmp_path):
    vae = build_vae(VaeConfig(block_channels=[8, 16, 16]), 16, seed=0).eval()
    vae.register_to_config(scaling_factor=0.42)
    vae.save_pretrained(tmp_path)
    back = AutoencoderKL.from_pretrained(tmp_path, local_files_only=True).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(vae(x).sample, back(x).sample)
    assert back.config.scaling_factor == 0.42


def test_prod_path_loads_a_diffusers_folder_and_stage_records_it(tmp_path, tracking, capsys):
    folder = tmp_path / "sd" / "vae"
    vae = tiny_vae().eval()
    vae.save_pretrained(folder)
    cfg = make_config(tmp_path / "w", f"vae.path={folder}", "vae.downsample=2", tracking)
    loaded = load_vae(cfg)
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x).sample, vae(x).sample)
    assert loaded.config.scaling_factor == 0.3
    m = run_stage("train-vae", cfg)  # no filter output needed: nothing is trained
    assert m["pretrained"]["path"] == str(folder) and len(m["pretrained"]["sha256"]) == 64
    assert run_stage("train-vae", cfg) == m
    assert "up to date" in capsys.readouterr().out


def _one_line_error(cfg, *needles: str) -> None:
    with pytest.raises(StageError) as e:
        load_vae(cfg)
    msg = str(e.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, msg


def test_missing_prod_path_is_one_line_naming_it(tmp_path):
    missing = tmp_path / "no" / "such" / "vae"
    _one_line_error(make_config(tmp_path, f"vae.path={missing}"), str(missing), "does not exist")


def test_mismatched_weights_name_the_path_and_keys(tmp_path):
    folder = tmp_path / "vae"
    tiny_vae().save_pretrained(folder)
    cfg = make_config(tmp_path, f"vae.path={folder}")
    state = load_file(folder / WEIGHTS)
    state.pop("decoder.conv_out.bias")
    state["decoder.extra.weight"] = torch.zeros(1)
    save_file(state, folder / WEIGHTS)
    _one_line_error(cfg, str(folder), "missing: decoder.conv_out.bias", "unexpected: decoder.extra.weight")
    save_file(tiny_vae((16, 16)).state_dict(), folder / WEIGHTS)  # another architecture's weights
    _one_line_error(cfg, str(folder), "wrong shape: encoder.conv_in.weight")


def test_missing_inputs_are_one_line_errors(tmp_path):
    cfg = make_config(tmp_path)
    with pytest.raises(StageError, match="filtered/manifest.json does not exist: run the filter stage first"):
        run_stage("train-vae", cfg)
    _one_line_error(cfg, str(tmp_path / "models" / "vae"), "run train-vae first")


def test_unreadable_shard_is_skipped_and_counted(ingested, tracking, tmp_path):
    raw_cfg, _ = ingested
    make_filtered_standin(raw_cfg.workdir, tmp_path, corrupt=True)
    cfg = make_config(tmp_path, "vae.steps=2", "vae.block_channels=[8,8,8]", tracking)
    # Bug caught: a stage that trains on what it could read and commits as if nothing was lost.
    with pytest.warns(UserWarning, match="skipping unreadable shard"), pytest.raises(StageError, match="99999.tar"):
        run_stage("train-vae", cfg)
    assert not (tmp_path / "models" / "vae" / "manifest.json").exists()
    with pytest.warns(UserWarning, match="skipping unreadable shard"):
        m = run_stage("train-vae", cfg, allow_partial=True)
    assert m["skipped_shards"] == 1 and "99999.tar" in m["skipped"][0] and m["partial"] is True
    assert m["train_images"] == 120


def test_training_crops_are_random_windows_of_their_own_images():
    """The local profile trains on 24 px crops of 64 px images (docs/QUALITY.md: more, smaller crops).

    Bugs caught: every crop taken at the same corner (the VAE would never see most of a scene), a crop
    cut from another image of the batch, or an image resized instead of cropped.
    """
    from ldm.autoencoder.train import _augment

    images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    x = _augment(torch.from_numpy(images), torch.Generator().manual_seed(0), 24, flip=False)
    assert x.shape == (8, 3, 24, 24)
    back = ((x + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    offsets = set()
    for k in range(len(images)):
        windows = {(i, j): images[k, i : i + 24, j : j + 24] for i in range(9) for j in range(9)}
        found = [ij for ij, w in windows.items() if np.array_equal(w, back[k])]
        assert len(found) == 1, f"crop {k} is no window of image {k}"
        offsets.add(found[0])
    assert len(offsets) > 1, offsets
