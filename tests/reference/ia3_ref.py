"""Float64 reference formulas for (IA)^3 layers, written from the paper, never imported by src/."""

from __future__ import annotations

import torch


def linear(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, vector: torch.Tensor, ff: bool
) -> torch.Tensor:
    """Feedforward: y = (x * l) W^T + b, l (in,); otherwise y = l * (x W^T + b), l (out,)."""
    x, w, vector = x.double(), w.double(), vector.double().flatten()
    bias = 0 if b is None else b.double()
    if ff:
        return (x * vector) @ w.T + bias
    return vector * (x @ w.T + bias)
