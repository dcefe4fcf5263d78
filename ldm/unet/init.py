"""A UNet's initial weights (`unet.init_from`): a diffusers UNet folder, e.g. a Stable Diffusion release, or an
earlier run of this pipeline; resolved, checked against the latents before any worker starts, and loaded.

What a release says about itself is read from its own files: the architecture from unet/config.json, the
prediction type from scheduler/scheduler_config.json, and the conditioning convention (which text layer,
how many positions, padding masked or not) from ldm_pipeline.json where this pipeline wrote it, else from
text_encoder/config.json: a `CLIPTextModel` of N layers gives the states after N blocks, all of its positions,
unmasked, since that is what StableDiffusionPipeline feeds the UNet.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel

from ldm.io import storage
from ldm.io.manifest import MANIFEST, StageError

WEIGHTS = "diffusion_pytorch_model.safetensors"
META = "ldm_pipeline.json"  # what this pipeline's exports add to the diffusers layout


def resolve_init(spec: str, workdir_url: str) -> dict[str, Any]:
    """Where unet.init_from points, as a record: the UNet folder's URL, config, weights file and its identity,
    the prediction type and conditioning convention where known, and, for a run, that run's own record."""
    parent = None
    if spec.startswith("runs/"):
        run = spec.removeprefix("runs/").strip("/")
        run_url = storage.join(workdir_url, "runs", run)
        if not run or "/" in run or not storage.exists(storage.join(run_url, MANIFEST)):
            raise StageError(f"unet.init_from {spec}: no finished run {run!r} in {workdir_url}/runs (no {MANIFEST})")
        made = storage.read_json(storage.join(run_url, MANIFEST))
        root, identity, parent = storage.join(run_url, "pipeline"), f"run:{made['config_hash']}", made.get("init")
    else:
        path = Path(spec.removeprefix("file://")).expanduser()
        if not path.is_dir():
            raise StageError(f"unet.init_from {spec} is not a local folder (weights are never downloaded)")
        root, identity = storage.normalize(str(path)), None
    unet_url, pipe_url = _unet_folder(spec, root)
    config = storage.read_json(storage.join(unet_url, "config.json"))
    if config.get("_class_name") != "UNet2DConditionModel":
        raise StageError(
            f"unet.init_from {spec}: {unet_url}/config.json describes a {config.get('_class_name')!r}, "
            "not a UNet2DConditionModel"
        )
    weights = storage.join(unet_url, WEIGHTS)
    if not storage.exists(weights):
        raise StageError(f"unet.init_from {spec}: {unet_url} has no {WEIGHTS} (only safetensors weights are read)")
    if identity is None:
        from ldm.stage import content_id

        identity = content_id(weights)
    return {
        "from": spec,
        "path": unet_url,
        "weights": identity,
        "config": config,
        "prediction_type": _prediction_type(pipe_url),
        "conditioning": _conditioning(pipe_url),
        "parent": parent,
    }


def _unet_folder(spec: str, root: str) -> tuple[str, str | None]:
    """(the UNet folder, the pipeline folder around it or None) of a release, pipeline or UNet folder."""
    if storage.exists(storage.join(root, "unet", "config.json")):
        return storage.join(root, "unet"), root
    if storage.exists(storage.join(root, "config.json")):
        up = root.rstrip("/").rsplit("/", 1)[0]
        return root, up if storage.exists(storage.join(up, "model_index.json")) else None
    raise StageError(f"unet.init_from {spec} is not a UNet folder: neither config.json nor unet/config.json there")


def _prediction_type(pipe_url: str | None) -> str | None:
    url = pipe_url and storage.join(pipe_url, "scheduler", "scheduler_config.json")
    return storage.read_json(url).get("prediction_type", "epsilon") if url and storage.exists(url) else None


def _conditioning(pipe_url: str | None) -> dict | None:
    if pipe_url is None:
        return None
    ours = storage.join(pipe_url, META)
    if storage.exists(ours):
        return storage.read_json(ours).get("conditioning")
    text = storage.join(pipe_url, "text_encoder", "config.json")
    if not storage.exists(text):
        return None
    c = storage.read_json(text)
    return {"depth": c["num_hidden_layers"], "context_length": c["max_position_embeddings"], "mask_padding": False}


def unet_from(init_config: Mapping[str, Any], latent_size: int) -> UNet2DConditionModel:
    """A UNet of the initial weights' architecture (freshly initialised), for latents of this size."""
    config = {k: v for k, v in init_config.items() if not k.startswith("_")} | {"sample_size": latent_size}
    return UNet2DConditionModel.from_config(config)


def check_init(init: dict[str, Any], latent_shape: list[int], text_dim: int, conditioning: dict,
               prediction_type: str) -> None:  # fmt: skip
    """Refuse initial weights that do not fit the latents, in one line: channels, text width, conditioning
    convention, prediction type, then the weight file's keys and shapes against the architecture."""
    c, spec = init["config"], init["from"]
    if c.get("in_channels") != latent_shape[0]:
        raise StageError(f"unet.init_from {spec}: its UNet takes {c.get('in_channels')} latent channels, "
                         f"the latents have {latent_shape[0]}")  # fmt: skip
    if c.get("cross_attention_dim") != text_dim:
        raise StageError(
            f"unet.init_from {spec}: its UNet's cross_attention_dim {c.get('cross_attention_dim')} differs from the "
            f"text states' width {text_dim} in the latents; precompute with the text encoder it was trained on"
        )
    theirs = init.get("conditioning")
    if theirs is not None and _norm(theirs) != _norm(conditioning):
        raise StageError(
            f"unet.init_from {spec} was conditioned on {describe(theirs)}, the latents hold {describe(conditioning)}; "
            "set text_encoder.blocks / context_length / mask_padding to its convention and rerun precompute"
        )
    if init.get("prediction_type") not in (None, prediction_type):
        raise StageError(
            f"unet.init_from {spec} predicts {init['prediction_type']} (its scheduler config), the config says "
            f"diffusion.prediction_type={prediction_type}; set it to {init['prediction_type']}"
        )
    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in unet_from(c, latent_shape[1]).state_dict().items()}
    have = _weight_shapes(init["path"])
    missing = [k for k in want if k not in have]
    extra = [k for k in have if k not in want]
    shape = [f"{k} {list(have[k])} vs {list(want[k])}" for k in want if k in have and have[k] != want[k]]
    if missing or extra or shape:
        parts = [
            f"{what} [{', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}]"
            for what, keys in (("missing", missing), ("unexpected", extra), ("shape differs", shape))
            if keys
        ]
        raise StageError(f"unet.init_from {spec}: {WEIGHTS} does not fit its config.json: {'; '.join(parts)}")


def _norm(conditioning: dict) -> tuple:
    depth = conditioning.get("depth")
    return (tuple(depth) if isinstance(depth, list) else depth, conditioning.get("context_length"),
            bool(conditioning.get("mask_padding", True)))  # fmt: skip


def describe(conditioning: dict) -> str:
    """A conditioning convention in words."""
    depth, ctx, masked = _norm(conditioning)
    layer = f"the states after {depth} text block(s)" if not isinstance(depth, tuple) else f"depths {list(depth)}"
    return f"{layer}, {ctx} positions, padding {'masked' if masked else 'unmasked'}"


def _weight_shapes(unet_url: str) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from a safetensors header, without reading the tensors."""
    import json
    import struct

    fs, path = storage.fs_for(storage.join(unet_url, WEIGHTS))
    with fs.open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def load_init(unet: UNet2DConditionModel, init: dict[str, Any]) -> None:
    """Load the initial weights into a UNet of their architecture (strict: check_init has run)."""
    from safetensors.torch import load

    fs, path = storage.fs_for(storage.join(init["path"], WEIGHTS))
    with fs.open(path, "rb") as f:
        state = load(f.read())
    unet.load_state_dict(state, strict=True)


def build_for(size: str, latent_shape: list[int], text_dim: int, init: dict | None = None,
              seed: int | None = None) -> UNet2DConditionModel:  # fmt: skip
    """The run's UNet, freshly initialised: of the initial weights' architecture when there are some, else of
    the named size (the weights are loaded afterwards: the initial ones, a checkpoint's or the EMA's)."""
    from ldm.unet.model import build_unet

    if init is not None:
        return unet_from(init["config"], latent_shape[1])
    return build_unet(size, latent_shape[0], latent_shape[1], text_dim, seed=seed)
