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
    delta = torch.einsum("or,ri...->oi...", bm.flatten(1), a)  # (out, in, *k)
    fn = CONV_FNS[w.dim() - 3]
    y = fn(x, w + scale * delta, None, stride, padding)
    return y if b is None else y + b.double().view(1, -1, *(1,) * (w.dim() - 2))


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
    k = w.shape[-1]
    cols = x.unfold(2, k, 1)  # (N, in, L', k)
    cin = cols.shape[1]
    per = cin // groups
    out_per = w.shape[0] // groups
    base = torch.cat(
        [
            torch.einsum(
                "nilk,oik->nol",
                cols[:, g * per : (g + 1) * per],
                w[g * out_per : (g + 1) * out_per],
            )
            for g in range(groups)
        ],
        dim=1,
    )
    h = torch.einsum("nilk,rik->nrl", cols, a)  # A is ungrouped: (N, r, L')
    r_per = bm.shape[1]
    lora = torch.cat(
        [
            torch.einsum(
                "nrl,or->nol",
                h[:, g * r_per : (g + 1) * r_per],
                bm[g * out_per : (g + 1) * out_per, :, 0],
            )
            for g in range(groups)
        ],
        dim=1,
    )
    y = base + scale * lora
    return y if b is None else y + b.double().view(1, -1, 1)


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
    merged = w + scale * torch.einsum("or,ri...->oi...", bm.flatten(1), a)
    norm = merged.flatten(1).norm(dim=1)  # (out,)
    factor = (m.flatten() / norm).view(-1, *(1,) * (w.dim() - 1))
    y = CONV_FNS[w.dim() - 3](x, factor * merged, None, 1, padding)
    return y if b is None else y + b.double().view(1, -1, *(1,) * (w.dim() - 2))


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
