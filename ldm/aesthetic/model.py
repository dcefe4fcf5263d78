"""The LAION improved-aesthetic-predictor MLP, with the public checkpoint's layout and state-dict keys."""

from __future__ import annotations

import io

import torch
from torch import nn

from ldm.io import storage
from ldm.io.manifest import StageError


class AestheticMLP(nn.Module):
    """768-1024-128-64-16-1 (input width follows the CLIP embedding), as in LAION's predictor.

    The public model has no non-linearities between its layers; we keep it that way so that
    `sac+logos+ava1-l14-linearMSE.pth` loads unchanged and scores identically.
    """

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Scores [N] for L2-normalised image embeddings [N, input_size]."""
        return self.layers(embeddings).squeeze(-1)


def _short(keys: list[str], limit: int = 6) -> str:
    return ", ".join(keys[:limit]) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "") or "none"


def load_aesthetic(path: str, input_size: int) -> AestheticMLP:
    """Load a LAION-format state dict (e.g. sac+logos+ava1-l14-linearMSE.pth) for a CLIP of width input_size."""
    fs, fpath = storage.fs_for(storage.normalize(str(path)))
    if not fs.isfile(fpath):
        raise StageError(f"aesthetic weights {path} do not exist")
    try:
        with fs.open(fpath, "rb") as f:
            state = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is the same user problem
        raise StageError(f"aesthetic weights {path} are not a readable torch state dict: {e}") from e
    if isinstance(state, dict) and "state_dict" in state:  # Lightning checkpoints wrap it
        state = state["state_dict"]
    model = AestheticMLP(input_size)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise StageError(
            f"aesthetic weights {path} do not match the LAION MLP: missing keys {_short(missing)}; "
            f"unexpected keys {_short(unexpected)}"
        )
    wrong = [k for k in expected if tuple(state[k].shape) != tuple(expected[k].shape)]
    if wrong:
        k = wrong[0]
        raise StageError(
            f"aesthetic weights {path} have shape {tuple(state[k].shape)} for {k}, expected {tuple(expected[k].shape)} "
            f"(input width {input_size} follows the CLIP image embedding)"
        )
    model.load_state_dict(state)
    return model.eval()
