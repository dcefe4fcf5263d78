"""One grid point of the sweep: sample the prompt set, decode, and measure FD, CLIP score and the judge."""

from __future__ import annotations

import itertools
import json
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
from ldm.train.export import INDEX, decode, load_text_encoder
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


def load_parts(cfg: PipelineConfig, pipeline_dir: Path, checkpoint: Path, scorer, extractor: Extractor) -> Parts:
    """UNets for the configured checkpoints (EMA from the export, raw from the checkpoint) and the other parts."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from safetensors.torch import load_file

    from ldm.unet.model import build_unet

    index = json.loads((pipeline_dir / INDEX).read_text())
    ema = UNet2DConditionModel.from_pretrained(pipeline_dir / "unet").eval()
    weights = checkpoint / TENSORS
    whash = storage.file_sha256(weights)
    unets, hashes = {"ema": ema}, {"ema": f"ema:{whash}"}
    if "raw" in cfg.evaluate.checkpoints:
        raw = UNet2DConditionModel.from_config(ema.config).eval()
        raw.load_state_dict({k[5:]: v for k, v in load_file(str(weights)).items() if k.startswith("unet.")})
        unets["raw"], hashes["raw"] = raw, f"raw:{whash}"
    torch.manual_seed(cfg.seed)  # the untrained baseline: a fresh init of the same architecture
    shape = index["latent_shape"]
    unets["untrained"] = build_unet(index["unet_size"], shape[0], shape[1], ema.config.cross_attention_dim).eval()
    hashes["untrained"] = f"untrained:{index['unet_size']}:seed{cfg.seed}"
    vae = AutoencoderKL.from_pretrained(pipeline_dir / "vae").eval()
    sched = DDPMScheduler.from_pretrained(pipeline_dir / "scheduler").config
    text = load_text_encoder(pipeline_dir, index)
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
    return ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


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


def run_point(parts: Parts, prompts: list[str], targets: dict | None, ref: tuple, point: dict,
              seed: int, batch: int, precision: str = "fp32") -> tuple[dict[str, float], np.ndarray]:  # fmt: skip
    """Metrics of one grid point and its first images (uint8): features and judge results streamed per batch."""
    states, mask, e_states, e_mask = prompt_states(parts, prompts)
    unet = parts.unets[point["checkpoint"]]
    scheduler = make_sampler(point["sampler"], parts.scheduler_config)
    stats, cos_sum = FeatureStats(parts.extractor.dim), 0.0
    preds: dict[str, list[np.ndarray]] = {k: [] for k in J.HEADS}
    first = None
    device_type = unet.device.type
    amp = autocast_dtype(precision, device_type) is not None
    for b, i in enumerate(range(0, len(prompts), batch)):
        g = torch.Generator().manual_seed(seed * 1_000_003 + b)
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=amp):
            latents = sample(unet, scheduler, states[i : i + batch], mask[i : i + batch], e_states, e_mask,
                             point["steps"], point["guidance"], g, parts.index["latent_shape"])  # fmt: skip
        images = to_uint8(decode(parts.vae, latents, parts.index["scale_factor"]))
        first = images[:GRID_IMAGES] if first is None else first
        emb = parts.scorer.encode_images(images)
        stats.update(emb if parts.extractor.name == "clip" else parts.extractor(images))
        cos_sum += clip_score(emb, parts.states["text_emb"][i : i + batch]) * len(images)
        if parts.judge is not None:
            for k, v in J.predict(parts.judge, images).items():
                preds[k].append(v)
    metrics = {"fd": frechet_distance(*stats.mean_cov(), *ref), "clip_score": cos_sum / len(prompts)}
    if parts.judge is not None and targets is not None:
        acc = J.accuracy({k: np.concatenate(v) for k, v in preds.items()}, targets)
        metrics.update({f"judge_{k}": v for k, v in acc.items()})
    return metrics, first


def ceilings(parts: Parts, batches, targets: dict) -> dict[str, float]:
    """The judge's accuracy on real held-out renders and on their VAE reconstructions (a latent model's ceiling)."""
    real: dict[str, list[np.ndarray]] = {k: [] for k in J.HEADS}
    recon: dict[str, list[np.ndarray]] = {k: [] for k in J.HEADS}
    for images in batches:
        x = torch.as_tensor(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
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
