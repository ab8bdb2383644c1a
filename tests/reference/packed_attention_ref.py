"""Float64 reference for attention over packed rows: softmax under a block-diagonal causal mask."""

from __future__ import annotations

import math

import torch


def block_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: list[list[tuple[int, int]]]
) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d) + mask) v`` in float64, ``(B, T, H, D)``.

    ``q`` is ``(B, H, T, D)``, ``k`` and ``v`` ``(B, H_kv, T, D)`` (each key / value head
    shared by ``H / H_kv`` query heads); a token attends to the tokens of its own span of
    ``spans[b]`` up to itself.
    """
    q, k, v = q.double(), k.double(), v.double()
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    width = q.shape[2]
    allowed = torch.zeros(q.shape[0], 1, width, width, dtype=torch.bool)
    for b, row in enumerate(spans):
        for s, e in row:
            allowed[b, 0, s:e, s:e] = torch.ones(e - s, e - s).tril().bool()
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, T, T)
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    return (weights @ v).transpose(1, 2)
