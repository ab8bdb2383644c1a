"""Float64 reference formulas for LoRA layers, written from the papers, never imported by src/."""

from __future__ import annotations

import torch


def linear(
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    a: torch.Tensor,
    bm: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """y = x W^T + b + scale * x A^T B^T, with W (out, in), A (r, in), B (out, r)."""
    x, w, a, bm = (t.double() for t in (x, w, a, bm))
    y = x @ w.T + scale * (x @ a.T) @ bm.T
    return y if b is None else y + b.double()


def conv1d(
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    a: torch.Tensor,
    bm: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """GPT-2 Conv1D stores W as (in, out): y = x W + b + scale * x A^T B^T."""
    return linear(x, w.T, b, a, bm, scale)


def embedding(
    ids: torch.Tensor, w: torch.Tensor, a: torch.Tensor, bm: torch.Tensor, scale: float
) -> torch.Tensor:
    """y = W[ids] + scale * (A^T)[ids] B^T, with A (r, vocab), B (dim, r)."""
    w, a, bm = w.double(), a.double(), bm.double()
    return w[ids] + scale * a.T[ids] @ bm.T


def dora(
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    a: torch.Tensor,
    bm: torch.Tensor,
    scale: float,
    magnitude: torch.Tensor,
) -> torch.Tensor:
    """DoRA: y = m / ||W + s B A||_row * (x (W + s B A)^T) + b."""
    x, w, a, bm, m = (t.double() for t in (x, w, a, bm, magnitude))
    merged = w + scale * bm @ a  # (out, in)
    y = (m / merged.norm(dim=1)) * (x @ merged.T)
    return y if b is None else y + b.double()


def dora_magnitude_init(
    w: torch.Tensor, a: torch.Tensor, bm: torch.Tensor, scale: float
) -> torch.Tensor:
    """DoRA's initial magnitude: the row norms of W + s B A."""
    return (w.double() + scale * bm.double() @ a.double()).norm(dim=1)
