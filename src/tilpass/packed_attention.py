"""Attention for packed rows without an L x L mask: one causal ``sdpa`` call per example.

Given position ids that restart per example and no attention mask, transformers builds a
block-diagonal ``(B, 1, T, T)`` boolean mask, and ``sdpa`` then scores every row's full
``T x T`` square (and repeats the key / value heads of a grouped-query model to match the
mask). For a row of examples of lengths ``n_1 .. n_k`` only ``sum n_i^2`` of those scores are
used. Here each example's span of the row goes to its own causal
``scaled_dot_product_attention`` call instead, which costs ``sum n_i^2`` and needs no mask; a
micro-batch can then be one padding-free row of all its examples (TRL's "padding-free"
layout, which transformers' ``sdpa`` path would otherwise answer with one ``T x T`` mask).

The function is registered with transformers' attention interface under :data:`NAME`, and
:class:`PackedAttention` switches a model from ``sdpa`` to it for a training run and back.
Every call that is not a packed training forward (a 2-D padding mask, a KV cache, one query
token) goes to transformers' own ``sdpa`` function unchanged, so evaluation and generation
during the run compute exactly what they compute without it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

NAME = "tilpass_packed_sdpa"  # contains "sdpa": transformers checks the model supports sdpa

Spans = list[list[tuple[int, int]]]  # per row, the [start, end) of each example


def example_spans(position_ids: torch.Tensor, rows: int) -> Spans | None:
    """Each row's example spans, where positions do not continue by one; None if no row packs.

    A new example starts wherever a position is not its predecessor plus one (transformers'
    rule for packed rows), so a row's padding tail, whose positions restart at 0, is a span of
    its own.
    """
    pos = position_ids.expand(rows, -1) if position_ids.shape[0] != rows else position_ids
    start = torch.ones_like(pos, dtype=torch.bool)  # (B, T)
    start[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    if not bool(start[:, 1:].any()):
        return None
    width = pos.shape[1]
    spans: Spans = []
    for row in start.cpu():
        cuts = [*row.nonzero().flatten().tolist(), width]
        spans.append(list(itertools.pairwise(cuts)))
    return spans


def _causal(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float, scale: Any
) -> torch.Tensor:
    """Causal attention of one example's span, grouped-query heads shared without copies."""
    gqa = query.shape[1] != key.shape[1]
    return F.scaled_dot_product_attention(
        query, key, value, dropout_p=dropout, is_causal=True, scale=scale, enable_gqa=gqa
    )


def packed_sdpa_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: ``(B, H, T, D)`` in, ``(B, T, H, D)`` out.

    Packed rows (no mask, as many keys as queries, positions restarting) run one causal call
    per example span; anything else goes to transformers' ``sdpa`` function.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    width = query.shape[2]
    packed = attention_mask is None and position_ids is not None and width > 1
    spans = None
    if packed and key.shape[2] == width and position_ids.shape[-1] == width:
        spans = example_spans(position_ids, query.shape[0])
    if spans is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    rows = []
    for b, row in enumerate(spans):
        parts = [
            _causal(
                query[b : b + 1, :, s:e],
                key[b : b + 1, :, s:e],
                value[b : b + 1, :, s:e],
                dropout,
                scaling,
            )  # (1, H, n, D)
            for s, e in row
        ]
        rows.append(torch.cat(parts, dim=2) if len(parts) > 1 else parts[0])
    out = torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]  # (B, H, T, D)
    return out.transpose(1, 2).contiguous(), None


def packed_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: Any = 0,
    kv_offset: Any = 0,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """transformers' mask-function contract: no mask for a packed (or plain causal) forward.

    Without a padding mask and without a cache offset, causality and example boundaries are
    :func:`packed_sdpa_forward`'s job, so the ``(B, 1, T, T)`` mask is never built; every
    other case gets ``sdpa``'s mask.
    """
    from transformers.masking_utils import sdpa_mask

    plain = isinstance(q_offset, int) and isinstance(kv_offset, int) and q_offset == kv_offset == 0
    if attention_mask is None and plain and q_length == kv_length:
        return None
    return sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        attention_mask=attention_mask,
        **kwargs,
    )


def register() -> None:
    """Add :data:`NAME` to transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, packed_sdpa_forward)
    AttentionMaskInterface.register(NAME, packed_mask)


def _config_of(model: nn.Module) -> Any:
    get_base = getattr(model, "get_base_model", None)
    base = get_base() if callable(get_base) else model
    return base, getattr(base, "config", None)


def supports_packed_attention(model: nn.Module) -> bool:
    """Whether the model is a transformers model on ``sdpa`` with full causal attention only.

    Sliding-window or mixed layer types are left alone: their windows live in the mask this
    module skips.
    """
    base, config = _config_of(model)
    if config is None or not callable(getattr(base, "set_attn_implementation", None)):
        return False
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    if getattr(config, "sliding_window", None) is not None:
        return False
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    return set(layer_types) == {"full_attention"} and bool(getattr(config, "is_causal", True))


class PackedAttention:
    """Switches one model between ``sdpa`` and :data:`NAME` for the span of a training run."""

    def __init__(self, model: nn.Module, enabled: bool) -> None:
        self.base, _ = _config_of(model)
        self.enabled = enabled

    @classmethod
    def for_model(cls, model: nn.Module) -> PackedAttention:
        """Enabled when :func:`supports_packed_attention` says the model qualifies."""
        return cls(model, supports_packed_attention(model))

    @contextmanager
    def active(self) -> Iterator[None]:
        """Inside: the model's attention is :data:`NAME` (when enabled); after: ``sdpa``."""
        if not self.enabled:
            yield
            return
        register()
        self.base.set_attn_implementation(NAME)
        try:
            yield
        finally:
            self.base.set_attn_implementation("sdpa")

    def disable(self) -> None:
        """Keep the model's own attention (a model whose packed logits failed the check)."""
        self.enabled = False
