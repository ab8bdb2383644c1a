"""The running batch's KV cache: one row per sequence, left-padded, with an attention mask.

Rows join (after their prefill) and leave (when finished or cancelled) between decode steps.
Every row's cache columns are laid out as its own prefill left them, behind padding columns
that the mask hides, so a row attends to exactly the keys it would see alone:

    keys, values   (B, kv_heads, C, head_dim) per layer
    mask           (B, C)  1 = a real cache entry, 0 = padding (or a masked virtual slot)

Padding entries hold zeros, never NaN, so a masked product 0 * v stays 0.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


def cache_tensors(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) of each layer of a filled cache."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def cache_from(tensors: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A cache holding the given (keys, values) per layer."""
    return DynamicCache(ddp_cache_data=tensors)


def zero_masked(cache: DynamicCache, mask: torch.Tensor) -> DynamicCache:
    """The cache with the entries under mask 0 set to zero (a fully masked query may leave
    non-finite values there, which a later product with probability 0 would turn into NaN)."""
    keep = mask.bool()[:, None, :, None]  # (B, 1, C, 1)
    zeros = torch.zeros((), dtype=cache.layers[0].keys.dtype, device=mask.device)
    return cache_from(
        [
            (torch.where(keep, k, zeros), torch.where(keep, v, zeros))
            for k, v in cache_tensors(cache)
        ]
    )


def left_pad(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """`tensor` with zeros in front along `dim` up to `width` entries."""
    missing = width - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


class BatchCache:
    """The KV cache and attention mask of the running batch (row i = the i-th sequence)."""

    def __init__(self) -> None:
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # (B, C) long

    @property
    def rows(self) -> int:
        return 0 if self.mask is None else int(self.mask.shape[0])

    def append(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        """Add the rows of a prefilled cache (rows keep their order, after the current ones)."""
        cache = zero_masked(cache, mask)
        if self.cache is None or self.mask is None:
            self.cache, self.mask = cache, mask
            return
        width = max(self.mask.shape[1], mask.shape[1])
        merged = []
        for (k0, v0), (k1, v1) in zip(cache_tensors(self.cache), cache_tensors(cache), strict=True):
            keys = torch.cat([left_pad(k0, width, 2), left_pad(k1, width, 2)])
            values = torch.cat([left_pad(v0, width, 2), left_pad(v1, width, 2)])
            merged.append((keys, values))
        self.cache = cache_from(merged)
        self.mask = torch.cat([left_pad(self.mask, width, 1), left_pad(mask, width, 1)])

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows` (in that order); columns no remaining row uses are dropped."""
        if self.cache is None or self.mask is None:
            return
        if not rows:
            self.cache, self.mask = None, None
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        used = mask.any(0).nonzero()
        first = int(used[0]) if used.numel() else mask.shape[1]
        self.mask = mask[:, first:]
        self.cache = cache_from(
            [
                (k.index_select(0, index)[:, :, first:], v.index_select(0, index)[:, :, first:])
                for k, v in cache_tensors(self.cache)
            ]
        )

    def step_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(attention_mask (B, C + 1), position_ids (B, 1)) for one decode step; the mask
        is kept, grown by the new column."""
        assert self.mask is not None
        positions = self.mask.sum(1, keepdim=True)  # (B, 1): real entries so far
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.rows, 1)], dim=1)
        return self.mask, positions
