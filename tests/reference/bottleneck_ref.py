"""Float64 reference formulas for bottleneck adapters, written from the papers, never imported
by src/."""

from __future__ import annotations

import torch
from torch.nn import functional as F

ACT = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}


def adapter(
    x: torch.Tensor,
    h: torch.Tensor,
    tensors: dict[str, torch.Tensor],
    act: str,
    scale: float,
    parallel: bool,
    residual: bool = True,
) -> torch.Tensor:
    """Sublayer input x, its output h: y = [h +] s (U act(D src + d) + u), src = x or h."""
    d_w, d_b = tensors["adapter_down.weight"].double(), tensors["adapter_down.bias"].double()
    u_w, u_b = tensors["adapter_up.weight"].double(), tensors["adapter_up.bias"].double()
    src = (x if parallel else h).double()
    delta = scale * (ACT[act](src @ d_w.T + d_b) @ u_w.T + u_b)
    return h.double() + delta if residual or parallel else delta
