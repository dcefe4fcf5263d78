"""ClipEncoder: the frozen CLIPs later stages use: the filter's scorer (`clip`) and the text encoder."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import CLIP

from ldm.clip.model import build_tokenizer, load_pretrained, load_saved
from ldm.config import PipelineConfig
from ldm.io import storage
from ldm.io.manifest import MANIFEST, StageError
from ldm.stage import Workdir, check_made_by


def to_model_input(
    images: np.ndarray | torch.Tensor,
    image_size: int,
    mean: Sequence[float] = open_clip.OPENAI_DATASET_MEAN,
    std: Sequence[float] = open_clip.OPENAI_DATASET_STD,
) -> torch.Tensor:
    """uint8 [N,H,W,3] images -> normalised float [N,3,S,S] at the model's image size."""
    if isinstance(images, np.ndarray) and not images.flags.writeable:  # e.g. decoded straight from a buffer
        images = images.copy()  # torch warns on read-only arrays; the float conversion copies anyway
    x = torch.as_tensor(images).permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[-2:] != (image_size, image_size):
        # Antialiased bicubic: the same filter open_clip's PIL transform uses, without a PIL round trip.
        x = F.interpolate(x, size=(image_size, image_size), mode="bicubic", antialias=True, align_corners=False)
        x = x.clamp_(0.0, 1.0)
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s


class ClipEncoder:
    """A frozen open_clip CLIP plus its tokenizer: image/text embeddings and per-token text states."""

    def __init__(
        self,
        model: CLIP,
        tokenizer: open_clip.SimpleTokenizer | None = None,
        batch_size: int = 256,
        blocks: int | Sequence[int] | None = None,
        context_length: int | None = None,
        mask_padding: bool = True,
    ):
        self.model = model.eval().requires_grad_(False)
        self.depths = text_depths(blocks, len(model.transformer.resblocks))
        if context_length is not None and not 2 <= context_length <= model.context_length:
            raise StageError(
                f"text_encoder.context_length {context_length}: this text model has {model.context_length} positions"
            )
        self.ctx = int(context_length or model.context_length)
        self.mask_padding = mask_padding
        self.tokenizer = tokenizer or build_tokenizer(self.ctx)
        self.batch_size = batch_size
        pre = getattr(model.visual, "preprocess_cfg", {}) or {}
        self.mean = tuple(pre.get("mean", open_clip.OPENAI_DATASET_MEAN))
        self.std = tuple(pre.get("std", open_clip.OPENAI_DATASET_STD))

    @property
    def image_size(self) -> int:
        """Side of the square images the vision tower takes."""
        size = self.model.visual.image_size
        return int(size[0] if isinstance(size, tuple | list) else size)

    @property
    def embed_dim(self) -> int:
        """Width of the joint image-text embedding."""
        return int(self.model.text_projection.shape[1])

    @property
    def token_width(self) -> int:
        """Width of the per-token text states: the text transformer's, times the layers side by side."""
        return int(self.model.transformer.width) * len(self.depths)

    @property
    def context_length(self) -> int:
        """Tokens per caption, SOT and EOT included."""
        return self.ctx

    @property
    def conditioning(self) -> dict:
        """The conditioning convention: the depth(s) read, positions per caption, whether padding is masked."""
        depth = self.depths[0] if len(self.depths) == 1 else list(self.depths)
        return {"depth": depth, "context_length": self.ctx, "mask_padding": self.mask_padding}

    @property
    def device(self) -> torch.device:
        """Where the model's weights live."""
        return next(self.model.parameters()).device

    def tokenize(self, captions: Sequence[str]) -> torch.Tensor:
        """Token ids [N, context_length]; long captions are truncated with EOT kept last."""
        return self.tokenizer(list(captions), context_length=self.context_length)

    def lengths(self, tokens: torch.Tensor) -> torch.Tensor:
        """Each row's true token count, SOT..EOT inclusive (EOT is the first end-of-text id)."""
        is_eot = tokens == self.tokenizer.eot_token_id
        return (is_eot.int().argmax(dim=1) + 1).long()

    @torch.no_grad()
    def encode_images(self, images: np.ndarray) -> torch.Tensor:
        """L2-normalised image embeddings [N, D] of uint8 [N,H,W,3] images."""
        out = []
        for i in range(0, len(images), self.batch_size):
            x = to_model_input(images[i : i + self.batch_size], self.image_size, self.mean, self.std)
            out.append(self.model.encode_image(x.to(self.device), normalize=True).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.embed_dim)

    @torch.no_grad()
    def encode_text(self, captions: Sequence[str]) -> torch.Tensor:
        """L2-normalised pooled text embeddings [N, D]."""
        out = []
        for i in range(0, len(captions), self.batch_size):
            tokens = self.tokenize(captions[i : i + self.batch_size]).to(self.device)
            out.append(self.model.encode_text(tokens, normalize=True).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.embed_dim)

    @torch.no_grad()
    def token_states(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token states [N, L, W] of a text layer after ln_final, and the positions the UNet attends to [N]:
        each caption's token count, or L for every caption when padding is not masked (SD 2's convention).

        With blocks None, exactly SD 2's FrozenOpenCLIPEmbedder(layer="penultimate"): every residual
        block but the last, with the causal mask, then the final LayerNorm; positions past a caption's
        length are padding states (kept, as SD 2 keeps them). `blocks` runs that many blocks instead;
        0 is the token and position embeddings alone; a list puts the states after each of those depths
        side by side along the width, in its order (text_encoder.blocks).
        """
        states, lengths = [], []
        for i in range(0, len(captions), self.batch_size):
            tokens = self.tokenize(captions[i : i + self.batch_size])
            states.append(self._states(tokens.to(self.device)).float().cpu())
            every = torch.full((len(tokens),), self.ctx, dtype=torch.long)  # unmasked: every position counts
            lengths.append(self.lengths(tokens) if self.mask_padding else every)
        if not states:
            return torch.zeros(0, self.context_length, self.token_width), torch.zeros(0, dtype=torch.long)
        return torch.cat(states), torch.cat(lengths)

    def _states(self, tokens: torch.Tensor) -> torch.Tensor:
        m = self.model
        cast = m.transformer.get_cast_dtype()
        n = tokens.shape[1]  # text_encoder.context_length may keep fewer positions than the model has
        x = m.token_embedding(tokens).to(cast) + m.positional_embedding[:n].to(cast)
        mask = None if m.attn_mask is None else m.attn_mask[:n, :n]
        batch_first = getattr(m.transformer, "batch_first", True)
        if not batch_first:
            x = x.transpose(0, 1)
        at = {0: x}
        for depth, block in enumerate(m.transformer.resblocks[: max(self.depths)], start=1):
            x = at[depth] = block(x, attn_mask=mask)
        picked = [at[d] if batch_first else at[d].transpose(0, 1) for d in self.depths]
        return torch.cat([m.ln_final(h) for h in picked], dim=-1)


def text_depths(blocks: int | Sequence[int] | None, layers: int) -> tuple[int, ...]:
    """The depths (blocks run) whose states token_states returns, side by side: None is the penultimate."""
    depths = (layers - 1,) if blocks is None else (blocks,) if isinstance(blocks, int) else tuple(blocks)
    for d in depths:
        if not 0 <= d <= layers:
            raise StageError(f"text_encoder.blocks {d}: this text transformer has {layers} blocks (0-{layers})")
    if not depths:
        raise StageError("text_encoder.blocks []: name at least one depth")
    return depths


def clip_url(cfg: PipelineConfig) -> str:
    """Where train-clip writes the tiny model: W/models/clip."""
    return Workdir.of(cfg).output("train-clip")


def load_text_encoder(cfg: PipelineConfig) -> ClipEncoder:
    """The conditioning text encoder: text_encoder.arch from its local weights, or the `clip` model when 'same'."""
    te = cfg.text_encoder
    if te.same_as_clip:
        encoder = load_encoder(cfg)
        return ClipEncoder(encoder.model, None, encoder.batch_size, te.blocks, te.context_length, te.mask_padding)
    weights = str(te.weights)
    # Checked here so the message names the text_encoder fields, not clip.* as load_pretrained's would.
    if not Path(weights.removeprefix("file://")).expanduser().is_file():
        raise StageError(f"text_encoder.weights {weights} is not a local file (weights are never downloaded)")
    if te.arch not in open_clip.list_models():
        raise StageError(f"text_encoder.arch {te.arch!r} is not an open_clip architecture")
    return ClipEncoder(load_pretrained(str(te.arch), weights), None, 256, te.blocks, te.context_length, te.mask_padding)


def load_encoder(cfg: PipelineConfig) -> ClipEncoder:
    """The profile's CLIP: the tiny one train-clip wrote, or a named open_clip arch from local weights."""
    if cfg.clip.arch != "tiny":
        if not cfg.clip.weights:
            raise StageError(f"clip.arch is {cfg.clip.arch!r} but clip.weights is not set (a local checkpoint file)")
        return ClipEncoder(load_pretrained(cfg.clip.arch, cfg.clip.weights))
    folder = clip_url(cfg)
    url = storage.join(folder, MANIFEST)
    if not storage.exists(url):
        raise StageError(f"no trained CLIP in {folder} (no {MANIFEST}); run the train-clip stage first")
    # A model trained from another config would silently skew every later stage.
    check_made_by(storage.read_json(url), cfg, folder, "train-clip")
    return ClipEncoder(load_saved(folder))
