"""LoRA on `nn.MultiheadAttention`: its packed q/k/v projection (`in_proj_weight`) and its
output projection, as PEFT adapts it.

The layer is `LoraParameters` (the module runs with W + s B A in place of each weight) plus
the attributes PyTorch's own code reads from an attention module it holds: an
`nn.TransformerEncoderLayer` asks its `self_attn` for `batch_first`, `in_proj_bias` and the
like before every call, so a wrapped attention must answer as the module it wraps (PEFT's
layer exposes the same names).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tilpass.methods.lora.parameter import LoraParameters, target_for


class LoraAttention(LoraParameters):
    """LoRA on a MultiheadAttention's `in_proj_weight` and `out_proj.weight`, answering for
    the wrapped module's settings (`embed_dim`, `num_heads`, `batch_first`, ...) and its
    `merge_masks`. Tensors (`in_proj_weight`, `out_proj`, `bias_k`, ...) are the wrapped
    module's own objects, registered on the layer as for every adapter layer."""

    def __init__(self, base: nn.MultiheadAttention) -> None:
        targets = [
            target_for(base, "in_proj_weight", ""),
            target_for(base, "out_proj.weight", "base_layer.out_proj."),
        ]
        super().__init__(base, targets, dropout_ok=True)
        for name in ("bias_k", "bias_v"):  # None unless add_bias_kv (then a parameter)
            if name not in self._parameters:
                setattr(self, name, None)

    @property
    def attention(self) -> nn.MultiheadAttention:
        """The wrapped attention module."""
        module = self.base_layer
        assert isinstance(module, nn.MultiheadAttention)
        return module

    @property
    def embed_dim(self) -> int:
        return self.attention.embed_dim

    @property
    def kdim(self) -> int:
        return self.attention.kdim

    @property
    def vdim(self) -> int:
        return self.attention.vdim

    @property
    def _qkv_same_embed_dim(self) -> bool:  # PyTorch's name, read by its transformer layers
        return self.kdim == self.embed_dim and self.vdim == self.embed_dim

    @property
    def num_heads(self) -> int:
        return self.attention.num_heads

    @property
    def head_dim(self) -> int:
        return self.attention.head_dim

    @property
    def dropout(self) -> float:
        return self.attention.dropout

    @property
    def batch_first(self) -> bool:
        return self.attention.batch_first

    @property
    def add_zero_attn(self) -> bool:
        return self.attention.add_zero_attn

    def merge_masks(
        self, attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, query: Any
    ) -> tuple[torch.Tensor | None, int | None]:
        """The wrapped module's `merge_masks` (one mask from the attention and padding masks)."""
        return self.attention.merge_masks(attn_mask, key_padding_mask, query)


def for_attention(module: nn.MultiheadAttention) -> LoraAttention:
    """LoRA on a MultiheadAttention's packed q/k/v projection and its output projection."""
    if not module.kdim == module.vdim == module.embed_dim:
        raise TypeError(
            "Only same embed for query/key/value is supported as of now for MultiheadAttention "
            f"(kdim={module.kdim}, vdim={module.vdim}, embed_dim={module.embed_dim}): LoRA "
            "adapts its packed in_proj_weight, as PEFT does"
        )
    return LoraAttention(module)
