"""The KL autoencoder: build a small diffusers AutoencoderKL, or load one from a diffusers-layout folder."""

from __future__ import annotations

import contextlib
import math
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from diffusers.utils import logging as diffusers_logging

from ldm.config import PipelineConfig, VaeConfig
from ldm.io import storage
from ldm.io.manifest import MANIFEST, StageError
from ldm.stage import Workdir, check_made_by

WEIGHTS_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
MAX_GROUPS = 32  # SD's GroupNorm group count
MIN_GROUP_WIDTH = 4  # channels per group in SD's narrowest (128-wide) blocks


def norm_groups(block_channels: list[int]) -> int:
    """GroupNorm group count dividing every block width, with at least MIN_GROUP_WIDTH channels per group.

    diffusers uses one count for all norms. One channel per group (instance norm) erases each
    channel's mean, the flat colours this data is made of; measured: 2 dB lower PSNR at equal steps.
    """
    width = math.gcd(*block_channels)
    limit = min(MAX_GROUPS, width // MIN_GROUP_WIDTH)
    return max((g for g in range(1, limit + 1) if width % g == 0), default=1)


def build_vae(vae_cfg: VaeConfig, resolution: int, seed: int | None = None) -> AutoencoderKL:
    """A fresh AutoencoderKL shaped by the config; downsampling is 2**(len(block_channels)-1).

    With a seed the initial weights are a pure function of it and the global RNG is left untouched.
    """
    n = len(vae_cfg.block_channels)
    if 2 ** (n - 1) != vae_cfg.downsample:
        raise ValueError(f"vae.downsample {vae_cfg.downsample} needs {vae_cfg.downsample.bit_length()} blocks, got {n}")
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=tuple(vae_cfg.block_channels),
            layers_per_block=vae_cfg.layers_per_block,
            latent_channels=vae_cfg.latent_channels,
            norm_num_groups=norm_groups(vae_cfg.block_channels),
            sample_size=resolution,
            scaling_factor=1.0,  # replaced by the measured 1/std once trained (SD's is 0.18215)
        )


def vae_dir(cfg: PipelineConfig) -> str:
    """URL of the VAE that train-vae writes: W/models/vae."""
    return Workdir.of(cfg).output("train-vae")


def local_path(path: str) -> Path:
    """A local folder from a bare path or file:// URL; other schemes are refused (weights load from disk)."""
    if "://" in path and not path.startswith("file://"):
        raise StageError(f"vae.path {path} must be a local folder (diffusers layout), not a remote URL")
    return Path(path.removeprefix("file://")).expanduser()


def weights_file(folder: Path) -> Path:
    """The folder's weights file (safetensors preferred, as diffusers does), or StageError naming the folder."""
    for name in WEIGHTS_FILES:
        if (folder / name).is_file():
            return folder / name
    raise StageError(f"VAE folder {folder} has no {' or '.join(WEIGHTS_FILES)}")


def _short(keys: list[str], limit: int = 4) -> str:
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


@contextlib.contextmanager
def _quiet_diffusers() -> Iterator[None]:
    # diffusers logs multi-line key lists and an accelerate hint; our own one-line error says it better.
    old = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(old)


def load_vae_folder(folder: Path | str, label: str | None = None) -> AutoencoderKL:
    """Load a diffusers-layout AutoencoderKL from local disk; any problem is a one-line StageError."""
    folder = Path(folder)
    label = label or str(folder)
    if not folder.is_dir():
        raise StageError(f"VAE folder {label} does not exist")
    if not (folder / "config.json").is_file():
        raise StageError(f"VAE folder {label} has no config.json (expected diffusers layout)")
    weights_file(folder)
    try:
        with _quiet_diffusers():
            vae, info = AutoencoderKL.from_pretrained(
                folder, local_files_only=True, low_cpu_mem_usage=False, output_loading_info=True
            )
    except RuntimeError as e:  # size mismatches: torch lists every tensor over many lines
        wrong = re.findall(r"size mismatch for ([\w.]+)", str(e))
        if not wrong:
            raise StageError(f"VAE folder {label} does not load: {str(e).splitlines()[0]}") from e
        raise StageError(f"VAE weights in {label} do not match its config.json: wrong shape: {_short(wrong)}") from e
    except (OSError, ValueError) as e:
        raise StageError(f"VAE folder {label} does not load: {str(e).splitlines()[0]}") from e
    missing, unexpected = sorted(info["missing_keys"]), sorted(info["unexpected_keys"])
    if missing or unexpected:
        parts = [
            f"missing: {_short(missing)}" if missing else "",
            f"unexpected: {_short(unexpected)}" if unexpected else "",
        ]
        raise StageError(f"VAE weights in {label} do not match its config.json: {'; '.join(p for p in parts if p)}")
    return vae.eval()


@contextlib.contextmanager
def local_copy(url: str) -> Iterator[Path]:
    """A local folder holding the files of a (possibly remote) folder URL; local folders are used in place."""
    url = storage.normalize(url)
    if url.startswith("file://"):
        yield Path(url.removeprefix("file://"))
        return
    fs, path = storage.fs_for(url)
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("config.json", *WEIGHTS_FILES):
            if fs.exists(f"{path}/{name}"):
                fs.get(f"{path}/{name}", f"{tmp}/{name}")
        yield Path(tmp)


def load_vae(cfg: PipelineConfig) -> AutoencoderKL:
    """The VAE every later stage uses: cfg.vae.path if set (prod), else the one train-vae wrote."""
    if cfg.vae.path:
        return load_vae_folder(local_path(cfg.vae.path))
    url = vae_dir(cfg)
    manifest_url = storage.join(url, MANIFEST)
    if not storage.exists(manifest_url):
        raise StageError(f"no trained VAE at {url} (no {MANIFEST}); run train-vae first")
    check_made_by(storage.read_json(manifest_url), cfg, url, "train-vae")
    with local_copy(url) as folder:
        return load_vae_folder(folder, label=url)
