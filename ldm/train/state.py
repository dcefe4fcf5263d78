"""Training state that survives a restart: LR schedule, EMA, and checkpoints (safetensors + JSON). No Ray here."""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

TENSORS = "state.safetensors"
META = "state.json"


def lr_at(step: int, base: float, warmup: int, total: int, schedule: str) -> float:
    """The learning rate for optimizer step `step` (0-based): linear warm-up, then cosine to 0 or constant."""
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    if schedule == "constant":
        return base
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class Ema:
    """An exponential moving average of a model's parameters, kept in float32."""

    def __init__(self, model: torch.nn.Module, decay: float, warmup: int):
        self.decay, self.warmup = decay, warmup
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters()}

    def decay_at(self, step: int) -> float:
        """The decay used after optimizer step `step` (1-based): ramped from 0 over `warmup` steps."""
        if self.warmup == 0:
            return self.decay
        # Early on the average would mostly hold the random init; ramp it in instead.
        return min(self.decay, self.decay * step / self.warmup)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        """shadow <- d * shadow + (1 - d) * params."""
        d = self.decay_at(step)
        for n, p in model.named_parameters():
            self.shadow[n].mul_(d).add_(p.detach().float(), alpha=1.0 - d)

    def copy_to(self, model: torch.nn.Module) -> None:
        """Load the averaged weights into a model of the same architecture."""
        model.load_state_dict({**model.state_dict(), **{n: v.to(model.dtype) for n, v in self.shadow.items()}})


def all_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first tensor holding a NaN or inf, or None."""
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            return name
    return None


def save_state(folder: str | Path, unet: torch.nn.Module, ema: Ema, opt: torch.optim.Optimizer, meta: dict) -> None:
    """Write a checkpoint folder: tensors (UNet, EMA, AdamW moments) in safetensors, the rest in JSON.

    Refuses (ValueError) weights that are not finite: a checkpoint must always be safe to resume from.
    """
    tensors = {f"unet.{k}": v.detach().contiguous().cpu() for k, v in unet.state_dict().items()}
    tensors.update({f"ema.{k}": v.contiguous().cpu() for k, v in ema.shadow.items()})
    bad = all_finite(tensors)
    if bad is not None:
        raise ValueError(f"refusing to checkpoint non-finite weights ({bad})")
    opt_state = opt.state_dict()
    for idx, st in opt_state["state"].items():
        for key, value in st.items():
            tensors[f"opt.{idx}.{key}"] = torch.as_tensor(value).contiguous().cpu()
    save_file(tensors, str(Path(folder) / TENSORS))
    rng = base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()
    full = {**meta, "param_groups": opt_state["param_groups"], "torch_rng": rng}
    (Path(folder) / META).write_text(json.dumps(full, indent=1))


def load_state(folder: str | Path, unet: torch.nn.Module, ema: Ema, opt: torch.optim.Optimizer) -> dict:
    """Restore a checkpoint written by save_state into the given objects; returns its JSON metadata."""
    tensors = load_file(str(Path(folder) / TENSORS))
    meta = json.loads((Path(folder) / META).read_text())
    unet.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("unet.")}, strict=True)
    for k, v in tensors.items():
        if k.startswith("ema."):
            ema.shadow[k[4:]] = v.float()
    state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, idx, key = k.split(".", 2)
            state.setdefault(int(idx), {})[key] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    rng = torch.frombuffer(bytearray(base64.b64decode(meta["torch_rng"])), dtype=torch.uint8)
    torch.set_rng_state(rng)
    return meta


def read_meta(folder: str | Path) -> dict:
    """A checkpoint's JSON metadata (step, data position, counters)."""
    return json.loads((Path(folder) / META).read_text())


def ema_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """The EMA parameters of a checkpoint, keyed like the UNet's state dict."""
    return {k[4:]: v for k, v in load_file(str(Path(folder) / TENSORS)).items() if k.startswith("ema.")}
