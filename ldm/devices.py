"""What the machine's processors can do fast, for the choices that depend on it."""

from __future__ import annotations

import torch


def use_bf16() -> bool:
    """Whether bf16 autocast pays on this CPU: with AMX tiles it is 2-3x faster, elsewhere slower than fp32."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private probe; absent -> assume no AMX
    return bool(amx and amx())
