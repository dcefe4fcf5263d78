"""The Stable Diffusion ecosystem both ways: continue a release, train in two resolution phases from one download,
export a folder StableDiffusionPipeline loads and that draws what `ldm generate` draws.

The release is a stand-in written here in diffusers layout: SD 2 base's UNet (its block types, linear
projections, two resnets per level) at reduced width, a PNDM scheduler config as SD 2 ships, and a
CLIPTextModel config whose layer count and positions are the conditioning its UNet was trained on. The module
works on a copy of the test world, precomputed in SD 2's conditioning convention (penultimate layer, every
position, unmasked) at 32 px and at 16 px from the same filtered shards.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ldm.io.manifest import StageError
from tests.helpers import make_config, stock_pipeline_gap

SD2 = ["text_encoder.mask_padding=false", "diffusion.prediction_type=epsilon", "train.log_every=1",
       "train.audit=true", "train.steps=3", "train.checkpoint_every=3"]  # fmt: skip
TEXT_DIM, DEPTH, CTX = 128, 3, 32  # the test CLIP's text tower: width 128, 4 blocks (penultimate: 3), 32 positions


def write_release(root: Path, cross_attention_dim: int = TEXT_DIM, prediction_type: str = "epsilon") -> Path:
    """A stand-in SD 2 base release in diffusers layout (random weights, the real key names and configs)."""
    from diffusers import PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(1, 2, 2, 2), cross_attention_dim=cross_attention_dim, use_linear_projection=True,
    )  # fmt: skip
    unet.save_pretrained(root / "unet", safe_serialization=True)
    PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type=prediction_type,
                  skip_prk_steps=True, steps_offset=1).save_pretrained(root / "scheduler")  # fmt: skip
    (root / "text_encoder").mkdir()
    CLIPTextConfig(hidden_size=cross_attention_dim, num_hidden_layers=DEPTH, max_position_embeddings=CTX,
                   num_attention_heads=2, intermediate_size=4 * cross_attention_dim).to_json_file(
        root / "text_encoder" / "config.json")  # fmt: skip
    index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
    }
    (root / "model_index.json").write_text(json.dumps(index))
    return root


@pytest.fixture(scope="module")
def world(latents, tmp_path_factory):
    """A copy of the test world (raw, filtered, models) with latents in SD 2's convention at 32 and 16 px."""
    from flows.registry import run as run_stage

    base, _ = latents
    work = tmp_path_factory.mktemp("sd")
    for sub in ("raw", "filtered", "models"):
        src = Path(base.workdir) / sub
        if src.is_dir():
            shutil.copytree(src, work / sub)
    ingest_before = (work / "raw" / "manifest.json").read_text()
    at32 = run_stage("precompute", make_config(work, *SD2))
    at16 = run_stage("precompute", make_config(work, *SD2, "precompute.resolution=16"))
    assert (work / "raw" / "manifest.json").read_text() == ingest_before  # the second phase downloaded nothing
    return work, at32, at16, write_release(tmp_path_factory.mktemp("release"))


def first_loss_outside(cfg, unet, latents_dir: Path, run_dir: Path) -> float:
    """Rank 0's first-step loss recomputed outside the pipeline: its audited keys, the same seeded draws."""
    import pyarrow.parquet as pq

    from ldm.diffusion.guidance import unet_model_fn
    from ldm.diffusion.objective import apply_cfg_dropout, training_losses
    from ldm.diffusion.schedule import make_noise_scheduler
    from ldm.io.latents import collate, empty_prompt
    from ldm.io.manifest import MANIFEST
    from ldm.train.loop import _step_seed

    m = json.loads((latents_dir / MANIFEST).read_text())
    keys = json.loads((run_dir / "audit" / "rank0.jsonl").read_text().splitlines()[0])["keys"]
    rows = {
        r["key"]: r for p in sorted((latents_dir / "parts").glob("*.parquet")) for r in pq.read_table(p).to_pylist()
    }
    batch = collate({k: np.array([rows[key][k] for key in keys], dtype=object) for k in rows[keys[0]]},
                    m["latent_shape"], m["text_dim"])  # fmt: skip
    g = torch.Generator().manual_seed(_step_seed(cfg.seed, 0, 0, 0))
    text, mask, _ = apply_cfg_dropout(batch["text"], batch["mask"], empty_prompt(m), cfg.train.cfg_dropout, g)
    x0 = batch["latents"]
    t = torch.randint(0, cfg.diffusion.timesteps, (x0.shape[0],), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    alphas = make_noise_scheduler(cfg.diffusion).alphas_cumprod
    d = cfg.diffusion
    with torch.no_grad():
        loss = training_losses(unet_model_fn(unet.eval()), x0, t, text, mask, noise, alphas, d.prediction_type,
                               d.snr_gamma, d.offset_noise, g).mean()  # fmt: skip
    return float(loss)


def logged_loss(cfg, mlflow_run_id: str) -> float:
    from mlflow import MlflowClient

    from ldm.tracking import tracking_uri

    history = MlflowClient(tracking_uri(cfg)).get_metric_history(mlflow_run_id, "loss")
    return next(h.value for h in history if h.step == 1)


@pytest.fixture(scope="module")
def phases(world):
    """Three runs: the release continued at 32 px (`cont`; SD 2's four levels need 8x8 latents at least), and two
    phases: the micro UNet at 16 px (`p16`), then continued from its EMA weights at 32 px (`p32`)."""
    from flows.flow import train_ldm
    from flows.registry import run as run_stage

    work, _, _, release = world
    cont_cfg = make_config(work, *SD2, f"unet.init_from={release}", "train.run_id=cont")
    cont = run_stage("train", cont_cfg)
    # The phases through the flow, as `ldm run` runs them: each phase's precompute and train, in order.
    phases = "phases=[{precompute.resolution: 16, train.run_id: p16}, {train.run_id: p32}]"
    done = train_ldm("test", [*SD2, phases], str(work), ["precompute", "train"])
    p2_cfg = make_config(work, *SD2, "unet.init_from=runs/p16", "train.run_id=p32")
    return {"cont": (cont_cfg, cont), "p16": (None, done["train[p16]"]), "p32": (p2_cfg, done["train"])}


def test_continued_release_starts_from_its_weights_and_records_where_they_came_from(world, phases):
    """Bugs: init_from ignored (a fresh UNet: another loss), weights loaded after the EMA copied the fresh ones, the
    budget probe or a restart replacing them; the release's origin missing from the manifest or MLflow."""
    from diffusers import UNet2DConditionModel
    from mlflow import MlflowClient

    from ldm.stage import content_id
    from ldm.tracking import tracking_uri

    work, _, _, release = world
    cfg, m = phases["cont"]
    unet = UNet2DConditionModel.from_pretrained(release / "unet")
    want = first_loss_outside(cfg, unet, work / "latents", work / "runs" / "cont")
    assert logged_loss(cfg, m["mlflow_run_id"]) == pytest.approx(want, rel=1e-4)
    weights = content_id(str(release / "unet" / "diffusion_pytorch_model.safetensors"))
    assert m["init"]["from"] == str(release) and m["init"]["weights"] == weights
    params = MlflowClient(tracking_uri(cfg)).get_run(m["mlflow_run_id"]).data.params
    assert params["init.weights"] == weights and params["init.path"].endswith("/unet")
    exported = json.loads((work / "runs" / "cont" / "pipeline" / "unet" / "config.json").read_text())
    assert exported["block_out_channels"] == [32, 64, 64, 64]  # the release's architecture, not unet.size's


def test_second_phase_starts_from_the_first_runs_ema_weights_at_another_resolution(world, phases):
    """Bugs: the phase-2 run reading the raw weights instead of the EMA export, or the 16 px latents; the two latent
    sets overwriting each other; the lineage stopping at the previous run."""
    from diffusers import UNet2DConditionModel

    work, at32, at16, _ = world
    assert at32["latent_shape"] == [4, 8, 8] and at16["latent_shape"] == [4, 4, 4]
    assert at32["inputs"]["filter"] == at16["inputs"]["filter"]  # the same filtered shards, ingested once
    assert (work / "latents" / "manifest.json").is_file() and (work / "latents-16px" / "manifest.json").is_file()
    cfg, m = phases["p32"]
    ema = UNet2DConditionModel.from_pretrained(work / "runs" / "p16" / "pipeline" / "unet")
    want = first_loss_outside(cfg, ema, work / "latents", work / "runs" / "p32")
    assert logged_loss(cfg, m["mlflow_run_id"]) == pytest.approx(want, rel=1e-4)
    assert m["init"]["from"] == "runs/p16" and m["init"]["weights"].startswith("run:")
    assert phases["p16"][1]["latents"]["url"].endswith("latents-16px")


def test_stable_diffusion_pipeline_loads_the_export_and_draws_what_ldm_generate_draws(world, phases, tmp_path):
    """Bugs: a model_index the pipeline cannot load, a scheduler other than the one generate samples with, the
    tokenizer padding unlike open_clip, the VAE scale factor or the text layer lost in the conversion."""
    work, _, _, _ = world
    folder = work / "runs" / "p32" / "pipeline"
    shape, gap = stock_pipeline_gap(folder, "a red circle on a white background!", 3.0, 4, 0, tmp_path)
    assert shape == (32, 32, 3) and gap <= 1.0
    meta = json.loads((folder / "ldm_pipeline.json").read_text())
    assert meta["conditioning"] == {"depth": DEPTH, "context_length": CTX, "mask_padding": False}


def test_converted_text_encoder_states_equal_open_clips():
    """A ViT-H-14-shaped open_clip text tower (GELU, 77 positions, heads of 64... at reduced width) converted to
    CLIPTextModel at the penultimate layer. Bugs: q/k/v split in the wrong order, the wrong layer cut, the final
    LayerNorm skipped, "!" tokenized as padding (SD 2's tokenizer does), truncation dropping the EOT."""
    import tempfile

    from open_clip.model import CLIP
    from transformers import CLIPTokenizer

    from ldm.clip.convert import to_text_model, write_tokenizer
    from ldm.clip.encoder import ClipEncoder

    torch.manual_seed(0)
    text_cfg = {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 4}
    vision_cfg = {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16}
    model = CLIP(embed_dim=64, vision_cfg=vision_cfg, text_cfg=text_cfg).eval()
    for p in model.parameters():  # trained-looking scales: random LayerNorm gains and biases too
        p.data.add_(0.02 * torch.randn_like(p))
    enc = ClipEncoder(model, mask_padding=False)
    captions = ["a red circle on a white background", "", "wow!! two BLUE squares, left of a hexagon!",
                " ".join(["word"] * 90)]  # fmt: skip
    states, lengths = enc.token_states(captions)
    assert lengths.tolist() == [77] * 4
    with tempfile.TemporaryDirectory() as d:
        write_tokenizer(Path(d), 77)
        ids = CLIPTokenizer.from_pretrained(d)(captions, padding="max_length", max_length=77, truncation=True,
                                               return_tensors="pt").input_ids  # fmt: skip
    assert torch.equal(ids, enc.tokenize(captions))
    with torch.no_grad():
        out = to_text_model(model, enc.depths[0], 77)(ids).last_hidden_state
    assert (out - states).abs().max() < 1e-5


def test_refusals_name_what_does_not_fit(world, latents, tmp_path):
    """One line before any worker: text width, conditioning convention, prediction type, not a UNet folder."""
    from flows.registry import run as run_stage

    work, _, _, release = world
    wide = write_release(tmp_path / "wide", cross_attention_dim=64)
    with pytest.raises(StageError, match="cross_attention_dim 64 differs from the text states' width 128"):
        run_stage("train", make_config(work, *SD2, f"unet.init_from={wide}", "train.run_id=r1"))
    # SD 2's four levels halve 4x4 latents (16 px) three times: refused here, not inside the workers
    with pytest.raises(StageError, match=r"halves the latents 3 times but latent size 4 .* not divisible by 8"):
        run_stage("train", make_config(work, *SD2, f"unet.init_from={release}", "precompute.resolution=16",
                                       "train.run_id=r0"))  # fmt: skip
    masked, _ = latents  # the test world's own latents: padding masked
    with pytest.raises(StageError, match="padding unmasked, the latents hold .* padding masked"):
        run_stage("train", make_config(masked.workdir, f"unet.init_from={release}", "train.run_id=r2"))
    v = write_release(tmp_path / "v", prediction_type="v_prediction")
    with pytest.raises(StageError, match="predicts v_prediction .* set it to v_prediction"):
        run_stage("train", make_config(work, *SD2, f"unet.init_from={v}", "train.run_id=r3"))
    with pytest.raises(StageError, match="is not a UNet folder"):
        run_stage("train", make_config(work, *SD2, f"unet.init_from={work / 'models' / 'clip'}", "train.run_id=r4"))
    vae = work / "models" / "vae"
    with pytest.raises(StageError, match="describes a 'AutoencoderKL', not a UNet2DConditionModel"):
        run_stage("train", make_config(work, *SD2, f"unet.init_from={vae}", "train.run_id=r5"))
