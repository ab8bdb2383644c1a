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

from tilpass.layers import tensor_version

if TYPE_CHECKING:
    from tilpass.methods.lora.conv import LoraConv
    from tilpass.methods.lora.embedding import LoraEmbedding
    from tilpass.methods.lora.layers import LoraLinear
    from tilpass.routing import Plan


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
        if torch.is_grad_enabled():  # the magnitude trains through m / ||W + dW||
            norm = layer.row_norm(layer.delta_weight(name).detach()).detach()  # (out,)
            mag = (layer.lora_magnitude_vector[name] / norm).to(result.dtype)  # (out,)
        else:  # inference: the cached table, not a weight norm per call (per decode step)
            mag = self.magnitude_table(layer, result.dtype, result.device)[layer.ids[name]]
        lora = F.linear(F.linear(xd.to(a.dtype), a), b).to(result.dtype) * spec.scale
        bias = layer.base_bias()
        if xd is x:
            base = result if bias is None else result - bias
        else:  # with dropout the base term is recomputed on the dropped input (as PEFT does)
            base = F.linear(xd, layer.weight_out_in().to(xd.dtype))
        return result + (mag - 1) * base + mag * lora

    def mixed_forward(
        self, layer: LoraLinear, x: torch.Tensor, plan: Plan, *args: Any, **kw: Any
    ) -> torch.Tensor:
        """A mixed batch of a Linear layer holding DoRA adapters, per token t of adapter g:

            y_t = r_t + (m_g - 1) * (r_t - b) + m_g * s_g B_g A_g x_t

        with r the base output, m_g = magnitude_g / ||W + s_g B_g A_g|| for a DoRA adapter and
        1 for a plain LoRA adapter or a base token (so those rows get r + s B A x). The LoRA
        terms are the grouped batched matmuls of the plain mixed path.
        """
        from tilpass.routing import grouped_lora

        if layer.training:
            raise NotImplementedError(
                "mixed batches with DoRA adapters run in eval mode only (dropout recomputes "
                "DoRA's base term per adapter); call model.eval(), or train one adapter"
            )
        result = layer.base_forward(x, *args, **kw)
        flat = result.reshape(-1, layer.out_features)  # (n, out)
        x2d = x.reshape(-1, layer.in_features)  # (n, in)
        delta = torch.zeros_like(flat)
        for sub, _, a_t, b_t in layer.rank_groups(plan, x.dtype):  # one bmm pair per rank
            grouped_lora(x2d, a_t, b_t, sub, delta)
        mag = self.token_magnitudes(layer, plan, flat.dtype)  # (n, out)
        bias = layer.base_bias()
        base = flat if bias is None else flat - bias.to(flat.dtype)
        out = flat + (mag - 1) * base + mag * delta
        if layer.lora_B_bias:
            out = out + layer.token_bias(plan, out.dtype)
        return out.view(result.shape)

    def token_magnitudes(self, layer: LoraLinear, plan: Plan, dtype: torch.dtype) -> torch.Tensor:
        """(n, out) each token's m / ||W + s B A|| (ones for base tokens, plain LoRA and
        adapters this layer does not hold)."""
        assert plan.token_ids is not None
        ids = plan.token_ids  # (n,)
        table = self.magnitude_table(layer, dtype, ids.device)
        base_row = table.shape[0] - 1
        return table[torch.where((ids >= 0) & (ids < base_row), ids, base_row)]

    def magnitude_table(
        self, layer: LoraLinear, dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """Rows by adapter id (last row: ones), kept on the layer until a weight it was
        computed from changes, so decode steps do not recompute the weight norms."""
        dora = [n for n, spec in layer.specs.items() if spec.variant is not None]
        params = [
            p
            for n in dora
            for p in (*layer.factors(n), layer.lora_magnitude_vector[n], layer.base_layer.weight)
        ]
        key = (
            dtype,
            device,
            [layer.ids[n] for n in dora],
            [(id(p), tensor_version(p)) for p in params],
        )
        cached = layer.magnitude_table
        if cached is not None and cached[0] == key:
            return cached[1]
        size = max(layer.ids.values()) + 2  # last row: base tokens
        table = torch.ones(size, layer.out_features, dtype=dtype, device=device)
        with torch.no_grad():
            for name in dora:  # per adapter, not per token
                norm = layer.row_norm(layer.delta_weight(name))  # (out,)
                table[layer.ids[name]] = (layer.lora_magnitude_vector[name] / norm).to(dtype)
        layer.magnitude_table = (key, table)
        return table

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
