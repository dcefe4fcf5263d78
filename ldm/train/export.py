"""The trained pipeline in diffusers layout (unet/, vae/, scheduler/, text_encoder/, model_index.json) and
`ldm generate` on it: guided sampling from prompts, decoded by the VAE."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from ldm.config import DiffusionConfig, PipelineConfig
from ldm.diffusion.guidance import make_sampler, sample
from ldm.diffusion.objective import fit_to_length
from ldm.diffusion.schedule import make_noise_scheduler
from ldm.io import storage
from ldm.io.manifest import StageError
from ldm.train.state import ema_weights
from ldm.unet.model import build_unet

INDEX = "model_index.json"


def _put(local: Path, url: str) -> None:
    """Copy a local folder tree to a folder URL (in place when the URL is the local folder itself)."""
    for f in sorted(p for p in local.rglob("*") if p.is_file()):
        storage.write_bytes_atomic(storage.join(url, *f.relative_to(local).parts), f.read_bytes())


def _copy_folder(src_url: str, dst: Path) -> None:
    fs, path = storage.fs_for(src_url)
    dst.mkdir(parents=True, exist_ok=True)
    for name in fs.ls(path, detail=False):
        base = name.rstrip("/").rsplit("/", 1)[-1]
        if fs.isfile(name) and base not in ("manifest.json", "_run.json"):
            fs.get(name, str(dst / base))


def export_pipeline(cfg: PipelineConfig, checkpoint_dir: str, out_url: str, latents: dict, vae_url: str) -> dict:
    """Write the EMA weights of a checkpoint, the VAE, the scheduler and the text encoder under out_url."""
    shape, text_dim = latents["latent_shape"], latents["text_dim"]
    unet = build_unet(cfg.unet.size, shape[0], shape[1], text_dim)
    unet.load_state_dict({**unet.state_dict(), **ema_weights(checkpoint_dir)})
    text = latents["text_encoder"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        unet.save_pretrained(root / "unet", safe_serialization=True)
        make_noise_scheduler(cfg.diffusion).save_pretrained(root / "scheduler")
        _copy_folder(vae_url, root / "vae")
        enc = root / "text_encoder"
        if text["arch"] == "tiny":
            _copy_folder(text["path"], enc)
        else:  # a named open_clip arch: its local checkpoint file, as the config names it
            enc.mkdir()
            shutil.copy(Path(text["path"].removeprefix("file://")), enc / Path(text["path"]).name)
        index = {
            "_class_name": "LatentDiffusion",
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "scheduler": ["diffusers", "DDPMScheduler"],
            "text_encoder": ["open_clip", text["arch"]],
            "text_encoder_file": None if text["arch"] == "tiny" else Path(text["path"]).name,
            "text_encoder_blocks": text.get("blocks"),  # the layer the UNet was conditioned on (None: penultimate)
            "latent_shape": shape,
            "scale_factor": latents["scale_factor"],
            "unet_size": cfg.unet.size,
        }
        (root / INDEX).write_text(json.dumps(index, indent=1))
        _put(root, out_url)
    return index


def sample_latents(unet, diffusion: DiffusionConfig, states, lengths, empty, steps: int, guidance: float,
                   seed: int, latent_shape, sampler: str = "ddim") -> torch.Tensor:  # fmt: skip
    """Guided DDIM latents for prompt states [N, L, D] with true lengths [N]; empty [L_e, D] is the uncond."""
    length = states.shape[1]
    mask = torch.arange(length)[None, :] < lengths[:, None]
    e_states, e_mask = fit_to_length(empty, empty.shape[0], length)
    scheduler = make_sampler(sampler, make_noise_scheduler(diffusion).config)
    g = torch.Generator().manual_seed(seed)
    return sample(unet.eval(), scheduler, states, mask, e_states[None], e_mask[None], steps, guidance, g, latent_shape)


@torch.no_grad()
def decode(vae, latents: torch.Tensor, scale_factor: float) -> torch.Tensor:
    """Images [N, 3, H, W] in [-1, 1] from latents scaled by the VAE's scale factor."""
    return vae.decode(latents / scale_factor).sample


def load_text_encoder(model_dir: Path, index: dict):
    """The exported text encoder as a ClipEncoder."""
    from ldm.clip.encoder import ClipEncoder
    from ldm.clip.model import load_pretrained, load_saved

    folder = model_dir / "text_encoder"
    blocks = index.get("text_encoder_blocks")
    if index["text_encoder"][1] == "tiny":
        return ClipEncoder(load_saved(str(folder)), blocks=blocks)
    model = load_pretrained(index["text_encoder"][1], str(folder / index["text_encoder_file"]))
    return ClipEncoder(model, blocks=blocks)


def generate(model: str, prompts: list[str], guidance: float, steps: int, seed: int, out: str) -> list[str]:
    """Images for prompts from an exported pipeline folder; one PNG per prompt (out, or out-<i>.png)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from PIL import Image

    root = Path(model)
    if not (root / INDEX).is_file():
        raise StageError(f"generate: {root} has no {INDEX}; pass the pipeline/ folder a train run exported")
    index = json.loads((root / INDEX).read_text())
    Path(out).parent.mkdir(parents=True, exist_ok=True)  # before the sampling, not after it
    unet = UNet2DConditionModel.from_pretrained(root / "unet").eval()
    vae = AutoencoderKL.from_pretrained(root / "vae").eval()
    scheduler = make_sampler("ddim", DDPMScheduler.from_pretrained(root / "scheduler").config)
    encoder = load_text_encoder(root, index)
    states, lengths = encoder.token_states(prompts)
    empty, empty_len = encoder.token_states([""])
    e_states, e_mask = fit_to_length(empty[0], int(empty_len[0]), states.shape[1])
    mask = torch.arange(states.shape[1])[None, :] < lengths[:, None]
    g = torch.Generator().manual_seed(seed)
    latents = sample(unet, scheduler, states, mask, e_states[None], e_mask[None], steps, guidance, g,
                     index["latent_shape"])  # fmt: skip
    images = decode(vae, latents, index["scale_factor"])
    arr = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    paths = [out] if len(prompts) == 1 else [str(Path(out).with_suffix("")) + f"-{i}.png" for i in range(len(prompts))]
    for path, img in zip(paths, arr, strict=True):
        Image.fromarray(np.ascontiguousarray(img)).save(path)
    return paths
