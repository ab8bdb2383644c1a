"""DoRA as a variant of the LoRA layer: the few hooks that weight decomposition changes.

DoRA (Liu et al., 2024) rescales each output row of the LoRA-updated weight by a learned
magnitude m, with the row norm detached (paper, section 4.3):

    y = m / ||W + s B A||_row * (W x + s B A x) + b

The LoRA layer asks its adapter's variant (None for plain LoRA) to create its extra tensors,
to compute its forward term, and to merge / unmerge; nothing else in the layer knows DoRA.
Creating, merging and unmerging are the same for every layer kind (the layer says along which
axes its norm runs, `row_norm`, and how a per-output vector broadcasts, `per_output`); the
forward differs, so Embedding and Conv layers have their own `apply`:

- Embedding (PEFT's layout): the norm runs over the vocabulary, one magnitude per embedding
  dimension: y = m / ||W + s (B A)^T||_col * (W[ids] + s A^T[ids] B^T).
- Conv1d / 2d / 3d: one magnitude per output channel, stored (1, out, 1, ...) as PEFT does;
  y = (m / ||.|| - 1) * conv(x, W) + m / ||.|| * s B(A(x)) + base(x).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from tilpass.methods.lora.conv import LoraConv
    from tilpass.methods.lora.embedding import LoraEmbedding
    from tilpass.methods.lora.layers import LoraLinear


class DoraVariant:
    """Weight-decomposed LoRA on Linear / Conv1D layers (magnitude `lora_magnitude_vector`)."""

    name = "DoRA"

    def create(self, layer: LoraLinear, name: str, initialize: bool, kw: dict[str, Any]) -> None:
        """Add the magnitude vector: ||W + s B A|| per output row, or empty before a load."""
        norm = torch.empty(layer.magnitude_shape(), **kw)
        if initialize:
            with torch.no_grad():
                norm = layer.row_norm(layer.delta_weight(name)).to(norm.dtype)
        layer.lora_magnitude_vector[name] = nn.Parameter(norm)

    def apply(
        self, layer: LoraLinear, x: torch.Tensor, xd: torch.Tensor, result: torch.Tensor, name: str
    ) -> torch.Tensor:
        """The DoRA output from the base output `result` (x: input, xd: dropped input)."""
        spec = layer.specs[name]
        a, b = layer.lora_A[name], layer.lora_B[name]
        norm = layer.row_norm(layer.delta_weight(name).detach()).detach()  # (out,)
        mag = (layer.lora_magnitude_vector[name] / norm).to(result.dtype)  # (out,)
        lora = F.linear(F.linear(xd.to(a.dtype), a), b).to(result.dtype) * spec.scale
        bias = layer.base_bias()
        if xd is x:
            base = result if bias is None else result - bias
        else:  # with dropout the base term is recomputed on the dropped input (as PEFT does)
            base = F.linear(xd, layer.weight_out_in().to(xd.dtype))
        return result + (mag - 1) * base + mag * lora

    def merge(self, layer: LoraLinear, name: str, delta: torch.Tensor) -> torch.Tensor:
        """The merged weight m / ||W + dW|| * (W + dW); remembers the norm for unmerging."""
        weight = layer.dense_weight()
        norm = layer.row_norm(delta)
        layer.variant_state[name] = norm
        factor = layer.per_output(layer.lora_magnitude_vector[name] / norm)
        return (factor * (weight.to(delta.dtype) + delta)).to(weight.dtype)

    def unmerge(self, layer: LoraLinear, name: str, delta: torch.Tensor) -> torch.Tensor:
        """The weight before merging: W' / factor - dW."""
        weight = layer.base_layer.weight
        norm = layer.variant_state.pop(name)
        factor = layer.per_output(layer.lora_magnitude_vector[name] / norm)
        return (weight.to(delta.dtype) / factor - delta).to(weight.dtype)


DORA = DoraVariant()


class DoraEmbeddingVariant(DoraVariant):
    """DoRA on nn.Embedding: one magnitude per embedding dimension (PEFT's layout)."""

    def scaled(
        self, layer: LoraEmbedding, name: str, result: torch.Tensor, lora: torch.Tensor
    ) -> torch.Tensor:
        """m / ||W + dW|| * (base result + LoRA term `lora`), the norm detached."""
        norm = layer.row_norm(layer.delta_weight(name).detach()).detach()  # (dim,)
        mag = (layer.lora_magnitude_vector[name] / norm).to(result.dtype)
        return mag * result + mag * lora


class DoraConvVariant(DoraVariant):
    """DoRA on Conv1d / Conv2d / Conv3d: one magnitude per output channel."""

    def apply(
        self, layer: LoraConv, x: torch.Tensor, xd: torch.Tensor, result: torch.Tensor, name: str
    ) -> torch.Tensor:
        """The DoRA output from the base output `result` (x: input, xd: dropped input)."""
        norm = layer.row_norm(layer.delta_weight(name).detach()).detach()  # (1, out, 1, ...)
        mag = (layer.lora_magnitude_vector[name] / norm).to(result.dtype)
        lora = layer.lora_term(xd, name).to(result.dtype)  # s B(A(xd)), bias-free
        bias = layer.base_bias()
        if xd is x:
            base = result if bias is None else result - layer.per_channel(bias)
        else:  # with dropout the base term is recomputed on the dropped input (as PEFT does)
            base = layer.base_conv(xd)
        return result + (mag - 1) * base + mag * lora


EMBEDDING_DORA = DoraEmbeddingVariant()
CONV_DORA = DoraConvVariant()
