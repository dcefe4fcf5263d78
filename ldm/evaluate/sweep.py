"""The sweep's work: one batch of one grid point sampled, decoded and measured (in a Ray actor, ldm.evaluate.workers),
and the batches of a point folded into its FD, CLIP score and judge accuracies (in the driver)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ldm.config import PipelineConfig
from ldm.devices import autocast_dtype
from ldm.diffusion.guidance import make_sampler, sample
from ldm.diffusion.objective import fit_to_length
from ldm.io import manifest, storage
from ldm.io.manifest import StageError
from ldm.metrics import judge as J
from ldm.metrics.features import Extractor
from ldm.metrics.frechet import FeatureStats, clip_score, frechet_distance
from ldm.train.export import decode, load_text_encoder, read_index
from ldm.train.state import TENSORS

GRID_IMAGES = 8  # images per point in the logged sample grid


@dataclass
class Parts:
    """The exported pipeline's parts, the scorer CLIP and the judge, loaded once per sweep."""

    root: Path
    index: dict
    unets: dict[str, torch.nn.Module]  # "ema", "raw", "untrained"
    model_hashes: dict[str, str]
    vae: torch.nn.Module
    scheduler_config: dict
    text: object
    scorer: object  # ClipEncoder for CLIP score
    extractor: Extractor
    judge: J.JudgeNet | None = None
    states: dict = field(default_factory=dict)


def model_hashes(cfg: PipelineConfig, index: dict, checkpoint: Path) -> dict[str, str]:
    """What identifies each configured UNet's weights (part of every sweep point's key): read, not loaded."""
    whash = storage.file_sha256(checkpoint / TENSORS)
    hashes = {"ema": f"ema:{whash}", "untrained": f"untrained:{index['unet_size']}:seed{cfg.seed}"}
    if "raw" in cfg.evaluate.checkpoints:
        hashes["raw"] = f"raw:{whash}"
    return hashes


def load_raw_unet(ema: torch.nn.Module, checkpoint: Path) -> torch.nn.Module:
    """The raw (not EMA) UNet weights of the checkpoint, in the EMA export's architecture."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    raw = UNet2DConditionModel.from_config(ema.config).eval()
    raw.load_state_dict({k[5:]: v for k, v in load_file(str(checkpoint / TENSORS)).items() if k.startswith("unet.")})
    return raw


def load_parts(cfg: PipelineConfig, pipeline_dir: Path, checkpoint: Path, scorer, extractor: Extractor,
               device: str = "cpu") -> Parts:  # fmt: skip
    """UNets for the configured checkpoints (EMA from the export, raw from the checkpoint) and the other parts,
    the networks moved to `device` (the scorer and the extractor are the caller's to place)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    index = read_index(pipeline_dir)
    ema = UNet2DConditionModel.from_pretrained(pipeline_dir / "unet").eval()
    unets = {"ema": ema}
    if "raw" in cfg.evaluate.checkpoints:
        unets["raw"] = load_raw_unet(ema, checkpoint)
    torch.manual_seed(cfg.seed)  # the untrained baseline: a fresh init of the same architecture
    unets["untrained"] = UNet2DConditionModel.from_config(ema.config).eval()
    unets = {k: u.to(device) for k, u in unets.items()}  # initialised on the CPU: the same weights on any device
    vae = AutoencoderKL.from_pretrained(pipeline_dir / "vae").eval().to(device)
    sched = DDPMScheduler.from_pretrained(pipeline_dir / "scheduler").config
    text = load_text_encoder(pipeline_dir, index)
    text.model.to(device)
    hashes = model_hashes(cfg, index, checkpoint)
    return Parts(pipeline_dir, index, unets, hashes, vae, sched, text, scorer, extractor)


def judge_key(cfg: PipelineConfig) -> str:
    """What identifies the judge: its version, training set, resolution and training precision (cache key
    and sweep-point param)."""
    ev, src = cfg.evaluate, cfg.source
    return manifest.digest({"version": J.JUDGE_VERSION, "samples": ev.judge_samples, "epochs": ev.judge_epochs,
                           "resolution": cfg.ingest.resolution, "source_seed": src.seed,
                           "image_size": src.image_size, "seed": cfg.seed,
                           "min_rating": cfg.filter.aesthetic_min, "precision": J.judge_precision()})  # fmt: skip


def judge_for(cfg: PipelineConfig) -> J.JudgeNet:
    """The judge for this world and resolution: cached by judge_key under W/cache/judge/, else trained."""
    from ldm.evaluate.data import cache_url

    ev, src = cfg.evaluate, cfg.source
    url = cache_url(cfg, "judge", judge_key(cfg), "safetensors")
    if storage.exists(url):
        fs, path = storage.fs_for(url)
        with fs.open(path, "rb") as f:
            return J.from_bytes(f.read())
    # The scenes the prompts come from: rated >= the filter's threshold (evaluate.data.prompt_set).
    images, targets = J.render_labelled(src.seed, itertools.count(J.JUDGE_START), src.image_size,
                                        cfg.ingest.resolution, cfg.filter.aesthetic_min, ev.judge_samples)  # fmt: skip
    net = J.train_judge(images, targets, ev.judge_epochs, cfg.seed)
    storage.write_bytes_atomic(url, J.to_bytes(net))
    return net


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Decoded images [N, 3, H, W] in [-1, 1] as uint8 [N, H, W, 3]."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def prompt_states(parts: Parts, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token states and mask of the prompts, and the empty prompt's padded to the same length (cached)."""
    if "cond" not in parts.states:
        states, lengths = parts.text.token_states(prompts)
        empty, empty_len = parts.text.token_states([""])
        e_states, e_mask = fit_to_length(empty[0], int(empty_len[0]), states.shape[1])
        mask = torch.arange(states.shape[1])[None, :] < lengths[:, None]
        parts.states["cond"] = (states, mask, e_states[None], e_mask[None])
        parts.states["text_emb"] = parts.scorer.encode_text(prompts)
    return parts.states["cond"]


@torch.no_grad()
def sample_batch(parts: Parts, prompts: list[str], point: dict, b: int, seed: int, batch: int,
                 precision: str) -> dict:  # fmt: skip
    """Batch `b` of a point (prompts b*batch onwards): its FD features, summed CLIP score, judge predictions,
    and for batch 0 the first images (uint8) of the point's logged grid.

    Batch b's noise comes from its own generator (seed * 1_000_003 + b) and the sampler is reset per batch,
    so a batch's images do not depend on which actor samples it, nor on what that actor sampled before.
    """
    states, mask, e_states, e_mask = prompt_states(parts, prompts)
    i = b * batch
    unet = parts.unets[point["checkpoint"]]
    scheduler = make_sampler(point["sampler"], parts.scheduler_config)
    device_type = unet.device.type
    amp = autocast_dtype(precision, device_type) is not None
    g = torch.Generator().manual_seed(seed * 1_000_003 + b)
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=amp):
        latents = sample(unet, scheduler, states[i : i + batch], mask[i : i + batch], e_states, e_mask,
                         point["steps"], point["guidance"], g, parts.index["latent_shape"])  # fmt: skip
    images = to_uint8(decode(parts.vae, latents, parts.index["scale_factor"]))
    emb = parts.scorer.encode_images(images)
    features = emb if parts.extractor.name == "clip" else parts.extractor(images)
    return {
        "features": features.numpy(),  # float32 [n, D]: the driver sums them in float64, in batch order
        "cos_sum": clip_score(emb, parts.states["text_emb"][i : i + batch]) * len(images),
        "preds": J.predict(parts.judge, images) if parts.judge is not None else None,
        "images": images[:GRID_IMAGES] if b == 0 else None,
    }


def batch_count(prompts: int, batch: int) -> int:
    """How many batches a point's prompts make."""
    return (prompts + batch - 1) // batch


def point_metrics(pieces: list[dict], ref: tuple, targets: dict | None) -> tuple[dict[str, float], np.ndarray]:
    """A point's metrics and first images from its batches' results, taken in batch order: the float64 sums
    then add up in the order one process sampling the batches in turn would add them."""
    stats, cos_sum, n = FeatureStats(pieces[0]["features"].shape[1]), 0.0, 0
    for piece in pieces:
        stats.update(piece["features"])
        cos_sum += piece["cos_sum"]
        n += len(piece["features"])
    metrics = {"fd": frechet_distance(*stats.mean_cov(), *ref), "clip_score": cos_sum / n}
    if targets is not None and pieces[0]["preds"] is not None:
        preds = {k: np.concatenate([p["preds"][k] for p in pieces]) for k in J.HEADS}
        metrics.update({f"judge_{k}": v for k, v in J.accuracy(preds, targets).items()})
    return metrics, pieces[0]["images"]


def judge_targets(specs: list) -> dict[str, np.ndarray]:
    """What each prompt names, per judge head (position and background only where named)."""
    rows = [J.prompted(s) for s in specs]
    return {k: np.array([r[k] for r in rows]) for k in J.HEADS}


def ceilings(parts: Parts, batches, targets: dict) -> dict[str, float]:
    """The judge's accuracy on real held-out renders and on their VAE reconstructions (a latent model's ceiling)."""
    real: dict[str, list[np.ndarray]] = {k: [] for k in J.HEADS}
    recon: dict[str, list[np.ndarray]] = {k: [] for k in J.HEADS}
    for images in batches:
        x = torch.as_tensor(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
        x = x.to(parts.vae.device)
        with torch.no_grad():
            back = to_uint8(parts.vae.decode(parts.vae.encode(x).latent_dist.mean).sample)
        for store, imgs in ((real, images), (recon, back)):
            for k, v in J.predict(parts.judge, imgs).items():
                store[k].append(v)
    out = {}
    for name, store in (("real", real), ("recon", recon)):
        acc = J.accuracy({k: np.concatenate(v) for k, v in store.items()}, targets)
        out.update({f"judge_{name}_{k}": v for k, v in acc.items()})
    return out


def pipeline_dir(url: str, tmp: str) -> Path:
    """The exported pipeline folder as a local path (copied into tmp from an object store)."""
    url = storage.normalize(url)
    if url.startswith("file://"):
        return Path(url.removeprefix("file://"))
    storage.download_folder(url, tmp)
    return Path(tmp)


def checkpoint_dir(m: dict, tmp: str) -> Path:
    """The latest checkpoint folder a train manifest names, local (copied into tmp from an object store);
    StageError when it is gone."""
    raw = m.get("checkpoint")
    url = storage.normalize(str(raw)) if raw else None
    if url is not None and not url.startswith("file://") and storage.exists(storage.join(url, TENSORS)):
        storage.download_folder(url, tmp)
        url = "file://" + tmp
    path = Path(url.removeprefix("file://")) if url else None
    if path is None or not (path / TENSORS).is_file():
        raise StageError(
            f"evaluate: run {m.get('run_id')} has no checkpoint ({raw or 'none recorded'} holds no {TENSORS}); "
            "rerun the train stage (with --overwrite)"
        )
    return path
