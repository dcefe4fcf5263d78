"""The trained pipeline as a StableDiffusionPipeline folder, and `ldm generate` on it.

unet/, vae/, scheduler/ (DDIM as `ldm generate` samples), text_encoder/ (the open_clip text tower the UNet
was conditioned on, as a transformers CLIPTextModel cut at that layer), tokenizer/ (CLIPTokenizer on
open_clip's BPE vocabulary) and model_index.json, so `StableDiffusionPipeline.from_pretrained(folder)` loads it
offline; ldm_pipeline.json adds what this pipeline needs beyond that (latent shape, scale factor, the
conditioning convention). Only SD 2's convention (every position, unmasked) is what the stock pipeline
feeds the UNet; a model trained on masked padding loads there but draws differently, and says so.
"""

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
from ldm.unet.init import META, build_for

INDEX = META  # this pipeline's own record of an export (the diffusers one is model_index.json)
OPEN_CLIP_TEXT = "open_clip_text"  # a text encoder no CLIPTextModel can express (several layers side by side)


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


def _open_clip_model(text: dict):
    """The open_clip CLIP the latents' text states came from (the tiny one's folder, or a named arch's file)."""
    from ldm.clip.model import load_pretrained, load_saved

    return load_saved(text["path"]) if text["arch"] == "tiny" else load_pretrained(text["arch"], str(text["path"]))


def _write_text_encoder(root: Path, text: dict, conditioning: dict) -> str | None:
    """text_encoder/ and tokenizer/ for the stock pipeline; None, or why the stock pipeline cannot reproduce."""
    from ldm.clip.convert import check_convertible, to_text_model, write_tokenizer

    model, depth, ctx = _open_clip_model(text), conditioning["depth"], conditioning["context_length"]
    if depth is None:  # latents from before the convention was recorded: SD 2's penultimate layer
        depth = conditioning["depth"] = len(model.transformer.resblocks) - 1
    why = check_convertible(model) if isinstance(depth, int) else "its text states are several layers side by side"
    if why is not None:  # kept as open_clip, for `ldm generate` and evaluate; the stock pipeline gets no text encoder
        if text["arch"] == "tiny":
            _copy_folder(text["path"], root / OPEN_CLIP_TEXT)
        else:
            (root / OPEN_CLIP_TEXT).mkdir()
            shutil.copy(Path(str(text["path"]).removeprefix("file://")), root / OPEN_CLIP_TEXT / "open_clip_model.bin")
        return f"the text encoder has no CLIPTextModel form: {why}"
    to_text_model(model, depth, ctx).save_pretrained(root / "text_encoder", safe_serialization=True)
    write_tokenizer(root / "tokenizer", ctx)
    if conditioning["mask_padding"]:
        return ("the UNet was trained with the padding past each caption masked (text_encoder.mask_padding), which "
                "StableDiffusionPipeline does not do: it loads, but draws differently from `ldm generate`")  # fmt: skip
    return None


def model_index(stock: bool) -> dict:
    """The diffusers model_index.json of a StableDiffusionPipeline folder (no safety checker)."""
    import diffusers

    text = ["transformers", "CLIPTextModel"] if stock else [None, None]
    return {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": text,
        "tokenizer": ["transformers", "CLIPTokenizer"] if stock else [None, None],
        "safety_checker": [None, None], "feature_extractor": [None, None], "image_encoder": [None, None],
        "requires_safety_checker": False,
    }  # fmt: skip


def export_pipeline(cfg: PipelineConfig, checkpoint_dir: str, out_url: str, latents: dict, vae_url: str,
                    init: dict | None = None) -> dict:  # fmt: skip
    """Write the EMA weights of a checkpoint, the VAE, the DDIM scheduler and the text encoder under out_url."""
    shape, text_dim = latents["latent_shape"], latents["text_dim"]
    unet = build_for(cfg.unet.size, shape, text_dim, init)
    unet.load_state_dict({**unet.state_dict(), **ema_weights(checkpoint_dir)})
    text, conditioning = latents["text_encoder"], latents["conditioning"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        unet.save_pretrained(root / "unet", safe_serialization=True)
        scheduler = make_sampler("ddim", make_noise_scheduler(cfg.diffusion).config)
        # StableDiffusionPipeline rewrites any other steps_offset to 1 (with a warning); trailing spacing ignores it.
        scheduler.register_to_config(steps_offset=1)
        scheduler.save_pretrained(root / "scheduler")
        _copy_folder(vae_url, root / "vae")
        why = _write_text_encoder(root, text, conditioning)
        meta = {
            "latent_shape": shape,
            "scale_factor": latents["scale_factor"],
            "unet_size": f"init:{init['path']}" if init else cfg.unet.size,
            "conditioning": conditioning,
            "text_encoder": {"arch": text["arch"], "path": text["path"],
                             "open_clip": OPEN_CLIP_TEXT if (root / OPEN_CLIP_TEXT).exists() else None},
            "stock_pipeline": "reproduces `ldm generate`" if why is None else why,
        }  # fmt: skip
        (root / INDEX).write_text(json.dumps(meta, indent=1))
        (root / "model_index.json").write_text(json.dumps(model_index(not (root / OPEN_CLIP_TEXT).exists()), indent=1))
        _put(root, out_url)
    if why is not None:
        print(f"export: {out_url}: StableDiffusionPipeline: {why}")
    return meta


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


def read_index(root: Path) -> dict:
    """An export's own record (ldm_pipeline.json); exports from before it kept the same keys in model_index.json."""
    if (root / INDEX).is_file():
        return json.loads((root / INDEX).read_text())
    legacy = root / "model_index.json"
    index = json.loads(legacy.read_text()) if legacy.is_file() else {}
    if "latent_shape" not in index:
        raise StageError(f"{root} has no {INDEX}; pass the pipeline/ folder a train run exported")
    return index


def load_text_encoder(model_dir: Path, index: dict):
    """The exported text encoder, as something with `token_states(captions)` and `.model`."""
    from ldm.clip.encoder import ClipEncoder
    from ldm.clip.model import load_pretrained, load_saved

    if "conditioning" not in index:  # an export from before the StableDiffusionPipeline layout
        folder, blocks = model_dir / "text_encoder", index.get("text_encoder_blocks")
        if index["text_encoder"][1] == "tiny":
            return ClipEncoder(load_saved(str(folder)), blocks=blocks)
        return ClipEncoder(load_pretrained(index["text_encoder"][1], str(folder / index["text_encoder_file"])),
                           blocks=blocks)  # fmt: skip
    c, te = index["conditioning"], index["text_encoder"]
    if te.get("open_clip"):
        folder = model_dir / te["open_clip"]
        model = load_saved(str(folder)) if te["arch"] == "tiny" else load_pretrained(te["arch"], str(
            folder / "open_clip_model.bin"))  # fmt: skip
        return ClipEncoder(model, None, 256, c["depth"], c["context_length"], c["mask_padding"])
    from ldm.clip.convert import TransformersText

    return TransformersText(model_dir, c["context_length"], c["mask_padding"])


def generate(model: str, prompts: list[str], guidance: float, steps: int, seed: int, out: str) -> list[str]:
    """Images for prompts from an exported pipeline folder; one PNG per prompt (out, or out-<i>.png)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from PIL import Image

    root = Path(model)
    try:
        index = read_index(root)
    except StageError as e:
        raise StageError(f"generate: {e}") from None
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
