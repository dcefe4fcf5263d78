"""Feature extractors for the Frechet distance, from an explicit registry: `clip` and `inception`.

Each extractor maps uint8 images [N, H, W, 3] to features [N, D] and names its weights by content
hash, so every reported FD says in which space it was measured. Weights are only ever read from
local files.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ldm.config import PipelineConfig
from ldm.io import storage
from ldm.io.manifest import MANIFEST, StageError
from ldm.stage import Workdir, content_id

INCEPTION_SIZE = 299


@dataclass
class Extractor:
    """A named feature function with the content hash of its weights."""

    name: str
    weights_hash: str
    dim: int
    fn: Callable[[np.ndarray], torch.Tensor]
    batch_size: int = 64

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> torch.Tensor:
        """Features [N, D] (float32, CPU) of uint8 images [N, H, W, 3], computed in batches."""
        out = [self.fn(images[i : i + self.batch_size]) for i in range(0, len(images), self.batch_size)]
        return torch.cat(out).float().cpu() if out else torch.zeros(0, self.dim)


def clip_weights_hash(cfg: PipelineConfig) -> str:
    """Identity of the configured CLIP: train-clip's config hash (tiny) or the weights file's sha256."""
    if cfg.clip.arch != "tiny":
        return content_id(str(cfg.clip.weights))
    url = storage.join(Workdir.of(cfg).output("train-clip"), MANIFEST)
    if not storage.exists(url):
        raise StageError(f"evaluate: no trained CLIP ({url} does not exist); run the train-clip stage first")
    return "train-clip:" + storage.read_json(url)["config_hash"]


def clip_extractor(cfg: PipelineConfig, encoder=None, device: str = "cpu") -> Extractor:
    """FD in the configured CLIP's image-embedding space (the embedded default's extractor); a given encoder
    stays where it is, a loaded one goes to `device`."""
    from ldm.clip.encoder import load_encoder

    enc = encoder if encoder is not None else load_encoder(cfg)
    if encoder is None:
        enc.model.to(device)
    return Extractor("clip", clip_weights_hash(cfg), enc.embed_dim, enc.encode_images, cfg.evaluate.batch_size)


def inception_path(cfg: PipelineConfig) -> Path:
    """The local InceptionV3 weights file the config names; StageError (one line) when it is not there."""
    raw = cfg.evaluate.inception_weights or ""
    if "://" in raw and not raw.startswith("file://"):
        raise StageError(f"evaluate: evaluate.inception_weights = {raw} must be a local file (never downloaded)")
    path = Path(raw.removeprefix("file://")).expanduser()
    if not raw or not path.is_file():
        raise StageError(
            f"evaluate: FID Inception weights {raw or '(unset)'} do not exist; put the file there or "
            "--set evaluate.inception_weights=<local file> (or evaluate.extractor=clip)"
        )
    return path


def load_inception(path: Path) -> torch.nn.Module:
    """torchvision's InceptionV3 with a state dict in its key layout (as pytorch-fid's FID weights use), pool3 out.

    The FID weights carry 1008 classes; the class count is read from the file's fc layer. torchvision's
    blocks pool slightly differently from the TF graph, so numbers are close to, not equal to, published FIDs.
    """
    from torchvision.models import Inception3

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a corrupt or foreign file: one line naming it
        raise StageError(f"evaluate: cannot read Inception weights {path}: {str(e).splitlines()[0]}") from e
    state = state.get("state_dict", state)
    if "fc.weight" not in state:
        raise StageError(f"evaluate: {path} is not an InceptionV3 state dict (no fc.weight)")
    net = Inception3(num_classes=state["fc.weight"].shape[0], aux_logits=False, init_weights=False)
    result = net.load_state_dict(state, strict=False)
    if result.missing_keys:
        raise StageError(f"evaluate: {path} misses InceptionV3 keys ({', '.join(result.missing_keys[:3])}, ...)")
    net.fc = torch.nn.Identity()  # pool3: the 2048-d features FID uses
    return net.eval().requires_grad_(False)


def inception_extractor(cfg: PipelineConfig, encoder=None, device: str = "cpu") -> Extractor:
    """FD in InceptionV3 pool3 space (the standard FID), weights from evaluate.inception_weights, on `device`."""
    path = inception_path(cfg)
    net = load_inception(path).to(device)

    def fn(images: np.ndarray) -> torch.Tensor:
        x = torch.as_tensor(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float() / 255.0
        x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
        return net(2 * x - 1)  # pytorch-fid's normalize_input: [0, 1] -> [-1, 1]

    return Extractor("inception", content_id(str(path)), 2048, fn, cfg.evaluate.batch_size)


EXTRACTORS: dict[str, Callable[..., Extractor]] = {"clip": clip_extractor, "inception": inception_extractor}


def check_extractor(cfg: PipelineConfig) -> None:
    """Refuse, before any sampling, an extractor whose weights are absent."""
    if cfg.evaluate.extractor == "inception":
        inception_path(cfg)


def make_extractor(cfg: PipelineConfig, encoder=None, device: str = "cpu") -> Extractor:
    """The configured extractor (evaluate.extractor) from the registry, on `device`."""
    return EXTRACTORS[cfg.evaluate.extractor](cfg, encoder, device)


def extractor_identity(cfg: PipelineConfig) -> tuple[str, str]:
    """(name, weights hash) of the configured extractor, as make_extractor's Extractor names them, without
    loading it: the driver keys sweep points by them while the actors hold the models."""
    if cfg.evaluate.extractor == "inception":
        return "inception", content_id(str(inception_path(cfg)))
    return "clip", clip_weights_hash(cfg)
