"""CLIP model builders and loaders: the tiny open_clip model train-clip makes, or a named one from local weights."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import open_clip
from open_clip.model import CLIP, set_model_preprocess_cfg

from ldm.config import ClipConfig
from ldm.io import storage
from ldm.io.manifest import StageError

CONFIG_FILE = "open_clip_config.json"  # the names open_clip's hub / local-dir layout uses
WEIGHTS_FILE = "open_clip_model.safetensors"
VOCAB_SIZE = 49408  # open_clip's SimpleTokenizer BPE vocabulary, shipped inside the package
# FLIP-style random patch dropping while training (open_clip skips it in eval mode): half the image
# tokens per step halves the vision tower's cost, and on a few thousand images it also regularises.
PATCH_DROPOUT = 0.5


def _head_width(width: int) -> int:
    """The widest standard attention head that divides the width (open_clip derives heads = width // head_width)."""
    return next((hw for hw in (64, 32, 16, 8) if width % hw == 0), width)


def tiny_model_config(clip_cfg: ClipConfig, image_size: int) -> dict[str, Any]:
    """The tiny model as an open_clip model-config dict (the JSON format of open_clip/model_configs)."""
    if clip_cfg.vision == "resnet":
        if image_size % 32:  # ModifiedResNet downsamples 32x before its attention pool
            raise ValueError(f"image size {image_size} is not a multiple of 32, which clip.vision=resnet needs")
        width = clip_cfg.vision_width or 16
        vision_cfg = {
            "image_size": image_size,
            "layers": [clip_cfg.vision_layers or 1] * 4,  # a list selects open_clip's ModifiedResNet
            "width": width,
            "head_width": _head_width(width * 32),
        }
    else:
        if image_size % clip_cfg.patch_size:
            raise ValueError(f"image size {image_size} is not a multiple of clip.patch_size {clip_cfg.patch_size}")
        width = clip_cfg.vision_width or 128
        vision_cfg = {
            "image_size": image_size,
            "layers": clip_cfg.vision_layers or 4,
            "width": width,
            "head_width": _head_width(width),
            "patch_size": clip_cfg.patch_size,
            "patch_dropout": PATCH_DROPOUT,
        }
    return {
        "embed_dim": clip_cfg.embed_dim,
        "vision_cfg": vision_cfg,
        "text_cfg": {
            "context_length": clip_cfg.context_length,
            "vocab_size": VOCAB_SIZE,
            "width": clip_cfg.text_width,
            "heads": clip_cfg.text_width // _head_width(clip_cfg.text_width),
            "layers": clip_cfg.text_layers,
        },
    }


def preprocess_config(model_config: dict[str, Any]) -> dict[str, Any]:
    """open_clip's preprocess config for a model config: its image size with the OpenAI mean/std."""
    return {
        "size": model_config["vision_cfg"]["image_size"],
        "mode": "RGB",
        "mean": list(open_clip.OPENAI_DATASET_MEAN),
        "std": list(open_clip.OPENAI_DATASET_STD),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }


def build_model(model_config: dict[str, Any]) -> CLIP:
    """A freshly initialised open_clip CLIP from a model-config dict (no weights loaded, no hub access)."""
    model = CLIP(**model_config)
    set_model_preprocess_cfg(model, preprocess_config(model_config))
    return model


def build_tokenizer(context_length: int) -> open_clip.SimpleTokenizer:
    """open_clip's CLIP BPE tokenizer; its vocabulary ships in the package, so nothing is downloaded."""
    return open_clip.SimpleTokenizer(context_length=context_length)


def save_model(model: CLIP, model_config: dict[str, Any], folder_url: str) -> None:
    """Write the model in open_clip's hub layout (config JSON + safetensors), loadable with `local-dir:`."""
    from safetensors.torch import save

    config = {"model_cfg": model_config, "preprocess_cfg": preprocess_config(model_config)}
    storage.write_json_atomic(storage.join(folder_url, CONFIG_FILE), config)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    storage.write_bytes_atomic(storage.join(folder_url, WEIGHTS_FILE), save(state))


def load_saved(folder_url: str) -> CLIP:
    """Load a model written by save_model from a folder URL (local or object store)."""
    from safetensors.torch import load

    config = storage.read_json(storage.join(folder_url, CONFIG_FILE))
    model = build_model(config["model_cfg"])
    fs, path = storage.fs_for(storage.join(folder_url, WEIGHTS_FILE))
    with fs.open(path, "rb") as f:
        state = load(f.read())
    model.load_state_dict(state, strict=True)
    return model


def _short_list(keys: list[str], limit: int = 4) -> str:
    """At most `limit` keys, then how many more: keeps the error on one readable line."""
    shown = ", ".join(keys[:limit])
    return f"{shown}, ... ({len(keys) - limit} more)" if len(keys) > limit else shown


def load_pretrained(arch: str, weights_path: str) -> CLIP:
    """An open_clip architecture by name with weights from a local checkpoint file; never touches the hub.

    Accepts the files open_clip publishes (.bin / .pt / .safetensors state dicts, also wrapped in
    {"state_dict": ...} with `module.` prefixes). Any problem is a one-line StageError naming the path.
    """
    path = Path(weights_path.removeprefix("file://")).expanduser()
    if not path.is_file():
        raise StageError(f"CLIP weights not found: {weights_path} (clip.weights for arch {arch}; must be a local file)")
    if arch not in open_clip.list_models():
        raise StageError(f"unknown open_clip architecture {arch!r} for {weights_path} (clip.arch)")
    try:
        # load_weights=False plus no tower defaults: open_clip builds the bare architecture only, and
        # the checkpoint is loaded below where we can report mismatches ourselves.
        with _root_log_level(logging.ERROR):  # open_clip warns "initialized randomly": true, until we load below
            model = open_clip.create_model(arch, load_weights=False, pretrained_image=False, pretrained_text=False)
    except Exception as e:  # e.g. an HF text tower that needs its config from the hub
        raise StageError(f"cannot build open_clip architecture {arch!r} offline: {_one_line(e)}") from e
    if not isinstance(model, CLIP):
        # Later stages read the penultimate text layer the way SD 2 does, which needs the standard tower.
        raise StageError(f"{arch!r} has a custom text tower ({type(model).__name__}); only standard CLIP archs work")
    try:
        result = open_clip.load_checkpoint(model, str(path), strict=False)
    except Exception as e:  # corrupt file, or tensors whose shapes do not fit the architecture
        raise StageError(f"cannot load {weights_path} into {arch}: {_one_line(e)}") from e
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing or unexpected:
        raise StageError(
            f"{weights_path} does not match architecture {arch}: "
            f"missing keys [{_short_list(missing)}], unexpected keys [{_short_list(unexpected)}]"
        )
    return model.eval()


@contextlib.contextmanager
def _root_log_level(level: int) -> Iterator[None]:
    """Temporarily raise the root logger's level (open_clip logs through the root logger)."""
    root = logging.getLogger()
    saved = root.level
    root.setLevel(max(level, saved))
    try:
        yield
    finally:
        root.setLevel(saved)


def _one_line(e: BaseException, limit: int = 300) -> str:
    """An exception as one short line (torch's load errors span many lines)."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"
