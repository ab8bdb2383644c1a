"""LoRA over `nn.Conv1d`, `nn.Conv2d` and `nn.Conv3d`, with PEFT's layout and semantics.

For a base convolution W (out, in / groups, *k) with its stride, padding, dilation and groups,
each adapter has two convolutions:

    A: (r, in, *k)            the base's kernel size, stride and padding (no dilation, no groups)
    B: (out, r / groups, 1..) a 1 x 1 convolution with the base's groups (bias: `lora_bias`)

    y = base(x) + s * B(A(dropout(x)))

With groups = 1 and dilation = 1 the update is the weight delta s * B A (B's 1 x 1 kernel
contracts with A's channels), so merging adds it into W; PEFT refuses to merge grouped
convolutions, and so does tilpass (also dilated ones, whose update is no weight delta). File
keys are PEFT's: `lora_A.weight`, `lora_B.weight`, `lora_B.bias`, `lora_magnitude_vector`
(DoRA, shaped (1, out, 1, ...)).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tilpass.methods.lora.dora import CONV_DORA
from tilpass.methods.lora.init import reads_weight
from tilpass.methods.lora.layer_checks import warn_if_no_base_bias
from tilpass.methods.lora.layers import AdapterSpec, LoraLayer, factor_tensors, init_factors
from tilpass.routing import Plan

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_FN: dict[int, Callable[..., torch.Tensor]] = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class LoraConv(LoraLayer):
    """LoRA over a 1-, 2- or 3-d convolution: y = base(x) + s * B(A(dropout(x)))."""

    STORES = ("lora_A", "lora_B", "lora_B_bias", "lora_magnitude_vector")

    def __init__(self, base: nn.Conv1d | nn.Conv2d | nn.Conv3d) -> None:
        super().__init__(base)
        self.dims = base.weight.dim() - 2  # spatial dimensions
        self.conv_fn = _CONV_FN[self.dims]
        self.in_features, self.out_features = int(base.in_channels), int(base.out_channels)
        self.groups = int(base.groups)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_B_bias = nn.ParameterDict()
        self.lora_magnitude_vector = nn.ParameterDict()

    @property
    def status_type(self) -> str:
        """PEFT's name in status reports: "lora.Conv1d" / "lora.Conv2d" / "lora.Conv3d"."""
        return f"lora.{type(self.base_layer).__name__}"

    # -- adapters ---------------------------------------------------------------------------
    def create(self, name: str, spec: AdapterSpec) -> None:
        """Fresh A and B (Kaiming A and zero B, as PEFT), on the base weight's device."""
        base = self.base_layer
        kind = type(base).__name__
        if spec.r % self.groups:
            raise ValueError(
                f"Targeting a {kind} with groups={self.groups} and rank {spec.r}. Currently, "
                "support is limited to conv layers where the rank is divisible by groups. Either "
                "choose a different rank or do not target this specific layer (rank_pattern "
                "sets a rank for one layer)."
            )
        warn_if_no_base_bias(base, spec)
        if reads_weight(spec.init):
            raise ValueError(
                f"init_lora_weights={spec.init!r} is for Linear layers; {kind} layers take "
                "True, False or 'gaussian' (as in PEFT)"
            )
        kw: dict[str, Any] = {"device": base.weight.device, "dtype": base.weight.dtype}
        ones = (1,) * self.dims
        a = torch.empty(spec.r, self.in_features, *base.kernel_size, **kw)
        b = torch.empty(self.out_features, spec.r // self.groups, *ones, **kw)
        bias = torch.zeros(self.out_features, **kw) if spec.lora_bias else None
        init_factors(a, b, spec.init, spec.r)
        if spec.init is False and bias is not None:  # random, as nn.ConvNd initialises itself
            bound = 1 / math.sqrt(spec.r // self.groups)
            nn.init.uniform_(bias, -bound, bound)
        self.lora_A[name] = nn.Parameter(a)
        self.lora_B[name] = nn.Parameter(b)
        if bias is not None:
            self.lora_B_bias[name] = nn.Parameter(bias)
        self.specs[name] = spec
        if spec.variant is not None:
            CONV_DORA.create(self, name, spec.init is not None, kw)

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return factor_tensors(self, name)

    def variant_for(self, name: str) -> Any:
        return CONV_DORA if self.specs[name].variant is not None else None

    def lora_bias_of(self, name: str) -> torch.Tensor | None:
        return self.lora_B_bias._parameters.get(name)

    # -- the pieces of the forward ----------------------------------------------------------
    def base_bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def per_channel(self, values: torch.Tensor) -> torch.Tensor:
        """A per-channel vector (out,) shaped to broadcast over an output (N, out, ...)."""
        return values.view(1, -1, *(1,) * self.dims)

    def base_conv(self, x: torch.Tensor) -> torch.Tensor:
        """The base convolution without its bias (DoRA's base term on a dropped input)."""
        base = self.base_layer
        return self.conv_fn(
            x, base.weight, None, base.stride, base.padding, base.dilation, base.groups
        )

    def lora_term(self, x: torch.Tensor, name: str, with_bias: bool = False) -> torch.Tensor:
        """s * B(A(x)) for adapter `name` (plus s * B's bias if `with_bias`)."""
        base = self.base_layer
        a, b = self.lora_A._parameters[name], self.lora_B._parameters[name]
        bias = self.lora_B_bias._parameters.get(name) if with_bias else None
        x = x if x.dtype == a.dtype else x.to(a.dtype)
        h = self.conv_fn(x, a, None, base.stride, base.padding)  # (N, r, ...)
        return self.conv_fn(h, b, bias, 1, 0, 1, self.groups) * self.specs[name].scale

    def apply_adapter(self, x: torch.Tensor, result: torch.Tensor, name: str) -> torch.Tensor:
        spec = self.specs[name]
        xd = F.dropout(x, spec.dropout, True) if spec.dropout and self.training else x
        if spec.variant is not None:
            return CONV_DORA.apply(self, x, xd, result, name)
        return result + self.lora_term(xd, name, with_bias=True).to(result.dtype)

    # -- merging ----------------------------------------------------------------------------
    def check_mergeable(self, name: str) -> None:
        base = self.base_layer
        if self.groups > 1:
            raise NotImplementedError(
                f"merging is not supported for {type(base).__name__} layers with groups > 1 "
                "(as in PEFT); keep the adapter unmerged"
            )
        if any(d != 1 for d in base.dilation):
            raise NotImplementedError(
                f"merging is not supported for a dilated {type(base).__name__} (dilation="
                f"{base.dilation}): LoRA's A convolution is not dilated, so its update is no "
                "weight delta; keep the adapter unmerged"
            )
        super().check_mergeable(name)

    def delta_weight(self, name: str) -> torch.Tensor:
        """s * B A in W's layout (out, in / groups, *k), in float32 at least.

        With groups = 1 this is the update the adapter makes to W. With groups > 1 it is
        PEFT's product of B viewed as (out / groups, r) and A as (r, in * k...), reshaped to
        W's shape: no weight delta (such layers do not merge), but the term PEFT's DoRA norms
        ||W + s B A|| are taken of, so DoRA magnitudes match PEFT's.
        """
        a, b = self.lora_A[name], self.lora_B[name]
        dtype = torch.promote_types(a.dtype, torch.float32)
        r = a.shape[0]
        delta = b.to(dtype).reshape(-1, r) @ a.to(dtype).reshape(r, -1)  # (out / groups, in*k)
        return delta.reshape(self.base_layer.weight.shape) * self.specs[name].scale

    def row_norm(self, delta: torch.Tensor) -> torch.Tensor:
        """||W + delta|| per output channel, shaped (1, out, 1, ...) as PEFT's DoRA stores it."""
        w = self.base_layer.weight.to(delta.dtype) + delta
        norm = w.norm(p=2, dim=tuple(range(1, w.dim())), keepdim=True)  # (out, 1, ...)
        return norm.transpose(0, 1)

    def per_output(self, values: torch.Tensor) -> torch.Tensor:
        """A per-output-channel tensor shaped to broadcast over W (out, in, *k)."""
        return values.reshape(-1, *(1,) * (self.dims + 1))

    def magnitude_shape(self) -> tuple[int, ...]:
        return (1, self.out_features, *(1,) * self.dims)

    # -- mixed batches ----------------------------------------------------------------------
    def rows(self, x: torch.Tensor) -> int:
        """Routing is per sample: (N, C, ...) holds N rows, an unbatched input one."""
        return int(x.shape[0]) if x.dim() == self.dims + 2 else 1

    def mixed_forward(self, x: torch.Tensor, plan: Plan, *args: Any, **kw: Any) -> torch.Tensor:
        """Each adapter present runs on its own samples (gathered with tensor indexing); a
        convolution's weights are not batched per sample, so this is one call per adapter
        present, not per row."""
        result = self.base_forward(x, *args, **kw)
        if x.dim() != self.dims + 2:
            raise ValueError("a mixed batch through a convolution needs a batched input")
        assert plan.token_ids is not None and plan.present is not None
        for adapter_id in plan.present.tolist():
            name = self.name_of.get(adapter_id)
            if name is None or name in self.merged:
                continue
            sel = (plan.token_ids == adapter_id).nonzero().squeeze(1)
            rows = self.apply_adapter(x.index_select(0, sel), result.index_select(0, sel), name)
            result = result.index_copy(0, sel, rows)
        return result
