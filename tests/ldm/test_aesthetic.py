"""The LAION aesthetic MLP: public layout and keys, loading checks, and that training learns ratings."""

from __future__ import annotations

import pytest
import torch

from ldm.aesthetic.model import AestheticMLP, load_aesthetic
from ldm.aesthetic.train import predict, spearman, train_aesthetic
from ldm.config import AestheticConfig
from ldm.io.manifest import StageError

# The state dict of LAION's sac+logos+ava1-l14-linearMSE.pth (improved-aesthetic-predictor, ViT-L/14).
LAION_SHAPES = {
    "layers.0.weight": (1024, 768), "layers.0.bias": (1024,),
    "layers.2.weight": (128, 1024), "layers.2.bias": (128,),
    "layers.4.weight": (64, 128), "layers.4.bias": (64,),
    "layers.6.weight": (16, 64), "layers.6.bias": (16,),
    "layers.7.weight": (1, 16), "layers.7.bias": (1,),
}  # fmt: skip


def test_state_dict_matches_the_public_checkpoint_layout():
    assert {k: tuple(v.shape) for k, v in AestheticMLP(768).state_dict().items()} == LAION_SHAPES


def test_a_laion_format_checkpoint_loads_and_scores_identically(tmp_path):
    torch.manual_seed(0)
    state = {k: torch.randn(shape) * 0.02 for k, shape in LAION_SHAPES.items()}
    path = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(state, path)
    model = load_aesthetic(str(path), 768)
    x = torch.nn.functional.normalize(torch.randn(4, 768), dim=-1)
    w = [state[f"layers.{i}.weight"] for i in (0, 2, 4, 6, 7)]
    b = [state[f"layers.{i}.bias"] for i in (0, 2, 4, 6, 7)]
    expected = x
    for wi, bi in zip(w, b, strict=True):  # the public MLP is purely linear
        expected = expected @ wi.T + bi
    assert torch.allclose(model(x), expected.squeeze(-1), atol=1e-5)


def test_missing_weights_are_named(tmp_path):
    with pytest.raises(StageError, match=r"aesthetic weights .*nope\.pth do not exist"):
        load_aesthetic(str(tmp_path / "nope.pth"), 768)


def test_mismatched_keys_are_named(tmp_path):
    state = {k: torch.zeros(s) for k, s in LAION_SHAPES.items() if k != "layers.7.bias"}
    state["head.weight"] = torch.zeros(1)
    path = tmp_path / "other.pth"
    torch.save(state, path)
    with pytest.raises(StageError) as e:
        load_aesthetic(str(path), 768)
    msg = str(e.value)
    assert "other.pth" in msg and "missing keys layers.7.bias" in msg and "unexpected keys head.weight" in msg
    assert "\n" not in msg


def test_wrong_input_width_is_explained(tmp_path):
    path = tmp_path / "l14.pth"
    torch.save({k: torch.zeros(s) for k, s in LAION_SHAPES.items()}, path)
    with pytest.raises(StageError, match=r"shape \(1024, 768\) for layers.0.weight, expected \(1024, 1024\)"):
        load_aesthetic(str(path), 1024)


def test_training_learns_a_rating_from_embeddings():
    g = torch.Generator().manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(600, 32, generator=g), dim=-1)
    direction = torch.nn.functional.normalize(torch.randn(32, generator=g), dim=0)
    ratings = 5.5 + 12 * (emb @ direction) + 0.3 * torch.randn(600, generator=g)
    model = train_aesthetic(emb[:500], ratings[:500], AestheticConfig(epochs=60, lr=1e-3, batch_size=64), seed=0)
    rho = spearman(predict(model, emb[500:]), ratings[500:].numpy())
    torch.manual_seed(0)
    rho_untrained = spearman(predict(AestheticMLP(32), emb[500:]), ratings[500:].numpy())
    assert rho > 0.9 and rho > rho_untrained + 0.3
