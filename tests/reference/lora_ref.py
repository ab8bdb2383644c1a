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


CONV_FNS = (torch.nn.functional.conv1d, torch.nn.functional.conv2d, torch.nn.functional.conv3d)


def conv(
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    a: torch.Tensor,
    bm: torch.Tensor,
    scale: float,
    stride: int = 1,
    padding: int = 0,
) -> torch.Tensor:
    """An ungrouped, undilated convolution with the weight delta of a 1 x 1 B after A:
    y = conv(x, W + scale * B A) + b, with A (r, in, *k), B (out, r, 1, ...)."""
    x, w, a, bm = (t.double() for t in (x, w, a, bm))
    y = CONV_FNS[w.dim() - 3](x, w + scale * _conv_delta(bm, a), None, stride, padding)
    return _plus_bias(y, b, w.dim() - 2)


def conv_grouped(
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    a: torch.Tensor,
    bm: torch.Tensor,
    scale: float,
    groups: int,
) -> torch.Tensor:
    """A grouped convolution (no weight delta exists): base + scale * B(A(x)), B grouped, each
    convolution written out as an unfold-and-matmul for 1-d inputs (stride 1, no padding)."""
    x, w, a, bm = (t.double() for t in (x, w, a, bm))
    cols = x.unfold(2, w.shape[-1], 1)  # (N, in, L', k)
    base = _per_group("nilk,oik->nol", cols, w, groups)
    h = torch.einsum("nilk,rik->nrl", cols, a)  # A is ungrouped: (N, r, L')
    y = base + scale * _per_group("nrl,or->nol", h, bm[:, :, 0], groups)
    return _plus_bias(y, b, 1)


def _per_group(spec: str, left: torch.Tensor, right: torch.Tensor, groups: int) -> torch.Tensor:
    """A grouped contraction: channel group g of `left` (axis 1) with output rows group g of
    `right`, concatenated over the output channels."""
    per, out_per = left.shape[1] // groups, right.shape[0] // groups
    parts = [
        torch.einsum(spec, left[:, g * per : (g + 1) * per], right[g * out_per : (g + 1) * out_per])
        for g in range(groups)
    ]
    return torch.cat(parts, dim=1)


def _plus_bias(y: torch.Tensor, b: torch.Tensor | None, spatial: int) -> torch.Tensor:
    """y + b over the channel axis (axis 1) of a convolution output with `spatial` axes."""
    return y if b is None else y + b.double().view(1, -1, *(1,) * spatial)


def _conv_delta(bm: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The weight delta B A of a convolution LoRA: (out, r, 1, ...) x (r, in, *k)."""
    return torch.einsum("or,ri...->oi...", bm.flatten(1), a)


def dora_conv(
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    a: torch.Tensor,
    bm: torch.Tensor,
    scale: float,
    magnitude: torch.Tensor,
    padding: int = 0,
) -> torch.Tensor:
    """DoRA on a convolution: y = conv(x, m / ||W'||_out * W') + b, W' = W + s B A, the norm
    per output channel over all other axes."""
    x, w, a, bm, m = (t.double() for t in (x, w, a, bm, magnitude))
    merged = w + scale * _conv_delta(bm, a)
    norm = merged.flatten(1).norm(dim=1)  # (out,)
    factor = (m.flatten() / norm).view(-1, *(1,) * (w.dim() - 1))
    y = CONV_FNS[w.dim() - 3](x, factor * merged, None, 1, padding)
    return _plus_bias(y, b, w.dim() - 2)


def grouped_dora_norm(
    w: torch.Tensor, a: torch.Tensor, bm: torch.Tensor, scale: float
) -> torch.Tensor:
    """PEFT's DoRA norm on a grouped convolution, per output channel (out,): of W + s * (B
    viewed (out / groups, r) @ A viewed (r, in * k)) reshaped to W's shape. For groups > 1 the
    product is no weight delta; PEFT defines the norm this way, and a file's magnitudes
    assume it."""
    w, a, bm = (t.double() for t in (w, a, bm))
    r = a.shape[0]
    term = (bm.reshape(-1, r) @ a.reshape(r, -1)).reshape(w.shape)
    return (w + scale * term).flatten(1).norm(dim=1)


def dora_conv_grouped(
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    a: torch.Tensor,
    bm: torch.Tensor,
    scale: float,
    magnitude: torch.Tensor,
    groups: int,
) -> torch.Tensor:
    """DoRA on a grouped 1-d convolution (stride 1, no padding), as PEFT computes it:
    y = m / n * (conv(x, W) + s * B(A(x))) + b, n = `grouped_dora_norm`."""
    factor = (magnitude.double().flatten() / grouped_dora_norm(w, a, bm, scale)).view(1, -1, 1)
    adapted = conv_grouped(x, w, None, a, bm, scale, groups)  # conv(x, W) + s * B(A(x))
    return _plus_bias(factor * adapted, b, 1)


def dora_embedding(
    ids: torch.Tensor,
    w: torch.Tensor,
    a: torch.Tensor,
    bm: torch.Tensor,
    scale: float,
    magnitude: torch.Tensor,
) -> torch.Tensor:
    """DoRA on an embedding (PEFT's layout): W' = W + s (B A)^T (vocab, dim), each embedding
    dimension rescaled by m / ||W'|| over the vocabulary: y = (W' * m / ||W'||_col)[ids]."""
    w, a, bm, m = w.double(), a.double(), bm.double(), magnitude.double()
    merged = w + scale * (bm @ a).T
    return (merged * (m / merged.norm(dim=0)))[ids]
