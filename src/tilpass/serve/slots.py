"""A KV cache with one fixed slot per sequence, and the attention that reads it.

The packed decode path (`packed.py`) runs every step as one forward pass over a ragged batch:
the new tokens of all running sequences laid end to end, (1, N), each with its own position.
Their keys and values go into a preallocated buffer per layer, one slot per sequence:

    keys, values   (slots, kv_heads, L, head_dim) per layer; slot s holds its sequence's
                   positions 0 .. length_s - 1 in columns 0 .. length_s - 1

A sequence that joins writes only its own slot, one that leaves frees it; nothing else moves
(no re-padding, no cache rebuilt). The attention regroups the step's queries by slot,
(slots, heads, Tq, head_dim), and runs the model's own SDPA kernel over each slot's columns
with a mask that lets the query at position p see columns 0 .. p: what that sequence alone
would attend to. `StepLayout` holds the per-step index tensors, built once and shared by
every layer.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

ATTENTION = "tilpass_slots"
GROW = 64  # capacity grows in whole multiples of this many positions


@dataclass
class StepLayout:
    """Where the step's N packed tokens go: their slot and position, and how queries regroup.

    Attributes:
        token_slot: (N,) slot of each token.
        token_pos: (N,) position of each token in its sequence (its cache column).
        span: slots 0 .. span - 1 take part in the attention (free ones in between are
            harmless: their padded queries see column 0 only and are dropped).
        width: the most new tokens any slot has this step (Tq).
        columns: cache columns the attention reads (1 + the largest position).
        q_index: (span * width,) token of each (slot, query) cell; padding cells point at 0.
        inverse: (N,) cell of each token; None when the cells are the tokens in order.
        mask: (span, 1, width, columns) True where a query may see a column.
    """

    token_slot: torch.Tensor
    token_pos: torch.Tensor
    span: int
    width: int
    columns: int
    q_index: torch.Tensor | None
    inverse: torch.Tensor | None
    mask: torch.Tensor


def build_layout(parts: list[tuple[int, int, int]], device: torch.device) -> StepLayout:
    """The layout of a step from its parts, (slot, first position, tokens) in packed order,
    one part per slot."""
    slots = torch.tensor([p[0] for p in parts], dtype=torch.long)
    starts = torch.tensor([p[1] for p in parts], dtype=torch.long)
    counts = torch.tensor([p[2] for p in parts], dtype=torch.long)
    token_slot = slots.repeat_interleave(counts)  # (N,)
    offsets = torch.cumsum(counts, 0) - counts  # (P,) first packed index of each part
    n = int(counts.sum())
    within = torch.arange(n) - offsets.repeat_interleave(counts)  # (N,) index in its part
    token_pos = starts.repeat_interleave(counts) + within
    span, width = int(slots.max()) + 1, int(counts.max())
    columns = int(token_pos.max()) + 1
    cell = token_slot * width + within  # (N,) cell of each token
    identity = width == 1 and span == n and bool((slots == torch.arange(n)).all())
    q_index = inverse = None
    query_pos = torch.zeros(span * width, dtype=torch.long)  # padding cells: position 0
    query_pos[cell] = token_pos
    if not identity:
        q_index = torch.zeros(span * width, dtype=torch.long)
        q_index[cell] = torch.arange(n)
        inverse = cell
    visible = torch.arange(columns)[None, :] <= query_pos[:, None]  # (cells, columns)
    mask = visible.view(span, 1, width, columns)
    return StepLayout(
        token_slot.to(device),
        token_pos.to(device),
        span,
        width,
        columns,
        None if q_index is None else q_index.to(device),
        None if inverse is None else inverse.to(device),
        mask.to(device),
    )


_LAYOUT: ContextVar[StepLayout | None] = ContextVar("tilpass_step_layout", default=None)


class SlotCache:
    """Per-layer (keys, values) buffers of shape (slots, kv_heads, capacity, head_dim).

    It answers the cache protocol a Hugging Face attention layer calls (`update`): the step's
    keys and values are written at their (slot, position) cells and the whole buffer comes
    back for `slot_attention` to read. Buffers are allocated on a layer's first update and
    grow (copying) when a sequence outgrows the capacity; stale columns of a freed slot stay
    finite and are masked.
    """

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.capacity = 0
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def reserve(self, columns: int) -> None:
        """Make room for `columns` positions in every slot (before a step's forward)."""
        if columns <= self.capacity:
            return
        capacity = max(columns, 2 * self.capacity)
        capacity = -(-capacity // GROW) * GROW
        for store in (self.keys, self.values):
            for layer, old in store.items():
                new = old.new_zeros(old.shape[0], old.shape[1], capacity, old.shape[3])
                new[:, :, : old.shape[2]] = old
                store[layer] = new
        self.capacity = capacity

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's (1, kv_heads, N, head_dim) keys and values into their cells."""
        layout = _LAYOUT.get()
        if layout is None or key.shape[0] != 1:
            raise RuntimeError("a SlotCache is only used inside the engine's packed step")
        if layer_idx not in self.keys:
            shape = (self.slots, key.shape[1], self.capacity, key.shape[3])
            self.keys[layer_idx] = key.new_zeros(shape)
            self.values[layer_idx] = value.new_zeros(shape)
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys[layout.token_slot, :, layout.token_pos] = key[0].transpose(0, 1)  # (N, kv, d)
        values[layout.token_slot, :, layout.token_pos] = value[0].transpose(0, 1)
        return keys, values


def slot_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """SDPA per slot for a packed step: query (1, heads, N, d) against the slot buffers;
    returns (1, N, heads, d) as the model's attention functions do. Outside a packed step
    it is plain SDPA."""
    layout = _LAYOUT.get()
    if layout is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    heads, n, dim = query.shape[1], query.shape[2], query.shape[3]
    q = query[0]  # (H, N, d)
    if layout.q_index is not None:
        q = q.index_select(1, layout.q_index)  # (H, span * Tq, d)
    q = q.reshape(heads, layout.span, layout.width, dim).transpose(0, 1)  # (span, H, Tq, d)
    k = key[: layout.span, :, : layout.columns]  # (span, kv, C, d)
    v = value[: layout.span, :, : layout.columns]
    kwargs = {k_: v_ for k_, v_ in kwargs.items() if k_ != "is_causal"}
    out, _ = sdpa_attention_forward(module, q, k, v, layout.mask, is_causal=False, **kwargs)
    out = out.reshape(layout.span * layout.width, heads, dim)  # (cells, H, d)
    if layout.inverse is not None:
        out = out.index_select(0, layout.inverse)  # (N, H, d)
    return out.view(1, n, heads, dim), None


AttentionInterface.register(ATTENTION, slot_attention)


@contextlib.contextmanager
def packed_step(model: torch.nn.Module, layout: StepLayout) -> Iterator[None]:
    """Within the block, `model` attends through `slot_attention` with `layout`."""
    config = model.config
    previous = config._attn_implementation
    token = _LAYOUT.set(layout)
    config._attn_implementation = ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = previous
        _LAYOUT.reset(token)


def supports_slots(model: torch.nn.Module) -> bool:
    """Whether `model` can run packed steps: a Hugging Face model whose attention goes
    through the attention-function registry with SDPA, every layer full (causal) attention
    and the KV cache passed to each attention layer."""
    config = getattr(model, "config", None)
    if config is None or not getattr(model, "_supports_attention_backend", False):
        return False
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    if getattr(config, "sliding_window", None) is not None:
        return False
    layer_types = getattr(config, "layer_types", None) or []
    if any(kind != "full_attention" for kind in layer_types):
        return False
    forward = inspect.signature(model.forward).parameters
    return "logits_to_keep" in forward and ("cache" in forward or "past_key_values" in forward)
