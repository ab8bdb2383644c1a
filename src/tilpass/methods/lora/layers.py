"""The LoRA layers: one object per wrapped module, holding any number of named adapters.

`LoraLinear` wraps `nn.Linear`, GPT-2's `Conv1D` and any linear-like module (one with
`in_features` / `out_features` and a forward of x W^T + b, such as a quantized linear);
`LoraEmbedding` wraps `nn.Embedding`. The shared base `LoraLayer` keeps merging, tied-weight
handling and the stacks of the batched mixed path. The formulas are in the package docstring.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from tilpass.layers import (
    AdapterLayer,
    dense_weight,
    has_plain_linear_forward,
    is_quantized,
    is_transposed,
    linear_features,
    requantized,
    tensor_version,
)
from tilpass.methods.lora.dora import DORA, DoraVariant
from tilpass.methods.lora.fused import LoraLinearFunction, lora_plus_bias
from tilpass.methods.lora.init import reads_weight, weight_init
from tilpass.methods.lora.layer_checks import check_residual_fits, warn_if_no_base_bias
from tilpass.routing import Plan, grouped_lora


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    """One adapter's settings as resolved for one layer (after rank/alpha patterns)."""

    r: int
    alpha: float
    dropout: float = 0.0
    use_rslora: bool = False
    variant: DoraVariant | None = None  # None: plain LoRA
    init: bool | str | None = True  # None: allocate only (the tensors are loaded next)
    lora_bias: bool = False  # B has a bias (key lora_B.bias), scaled with B

    @property
    def scale(self) -> float:
        """The factor in front of B A."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


@dataclasses.dataclass
class RankStack:
    """The adapters of one rank in one layer, stacked for the batched mixed path."""

    ids: tuple[int, ...]  # model ids, in stack order
    row_of_id: torch.Tensor  # (max id + 1,) stack row of each id (-1: not in this stack)
    a_t: torch.Tensor  # (G, in, r) stacked A^T (embedding: (G, vocab, r))
    b_t: torch.Tensor  # (G, r, out) stacked (s B)^T

    def rows_for(self, present: torch.Tensor) -> torch.Tensor:
        """Stack rows of the given ids (all of which are in this stack)."""
        return self.row_of_id.to(present.device)[present]


@dataclasses.dataclass
class _StackCache:
    """The rank stacks of one layer and what they were built from."""

    dtype: torch.dtype
    params: list[nn.Parameter]
    versions: list[object]
    stacks: list[RankStack]


class LoraLayer(AdapterLayer):
    """What the LoRA layer kinds share: merging, tied weights, the mixed path's stacks."""

    MERGEABLE = True
    MIXES_VARIANTS: ClassVar[bool] = False  # True: the mixed path applies DoRA itself
    A_KEY: ClassVar[str] = "lora_A"
    out_features: int  # the wrapped module's output width (channels, embedding size)
    B_KEY: ClassVar[str] = "lora_B"

    def __init__(self, base: nn.Module) -> None:
        super().__init__(base)
        self.variant_state: dict[str, torch.Tensor] = {}
        self._stack_cache: _StackCache | None = None
        # Other modules that use the wrapped weight tensor (GPT-2's wte is lm_head's weight):
        # merging then works on a private copy and unmerging puts the shared tensor back. A
        # quantized weight is kept the same way: merging re-quantizes into a new tensor.
        self.weight_shared_with: list[str] = []
        self._shared_weight: nn.Parameter | None = None

    @property
    def lora_a(self) -> nn.ParameterDict:
        return getattr(self, self.A_KEY)

    @property
    def lora_b(self) -> nn.ParameterDict:
        return getattr(self, self.B_KEY)

    def invalidate(self) -> None:
        self._stack_cache = None

    def dense_weight(self) -> torch.Tensor:
        """The wrapped weight, dense, in its stored layout (a quantized base dequantized)."""
        return dense_weight(self.base_layer)

    def variant_for(self, name: str) -> Any:
        """Adapter `name`'s variant object for this kind of layer (None for plain LoRA)."""
        return self.specs[name].variant

    def lora_bias_of(self, name: str) -> torch.Tensor | None:
        """Adapter `name`'s bias on B (`lora_bias=True`), or None."""
        return None

    def merge_bias(self, name: str, sign: float) -> None:
        """Add (sign = 1) or subtract (-1) s * bias_B into the wrapped bias (`lora_bias`)."""
        extra = self.lora_bias_of(name)
        if extra is None:
            return
        bias = getattr(self.base_layer, "bias", None)
        if bias is None:
            raise RuntimeError(
                f"adapter {name!r} has lora_bias=True but the wrapped "
                f"{type(self.base_layer).__name__} has no bias, so it cannot be merged; keep "
                "it unmerged"
            )
        bias.data += (sign * self.specs[name].scale * extra.detach()).to(bias.dtype)

    def magnitude_shape(self) -> tuple[int, ...]:
        """The shape of a DoRA magnitude in this layer (one entry per output)."""
        return (self.out_features,)

    def delta_weight(self, name: str) -> torch.Tensor:  # pragma: no cover - abstract
        """s * B A in the wrapped weight's layout, in float32 at least."""
        raise NotImplementedError

    def stack_pair(self, name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """One adapter's (A^T, (s B)^T) for the mixed path."""
        raise NotImplementedError  # pragma: no cover

    # -- merging ----------------------------------------------------------------------------
    def merge_targets(self) -> list[str]:
        return ["weight"]

    def mark_shared(self, users: dict[str, list[str]]) -> None:
        self.weight_shared_with = users.get("weight", [])

    def original_tensor(self, target: str) -> torch.Tensor:
        if target == "weight" and self._shared_weight is not None:
            return self._shared_weight
        return super().original_tensor(target)

    def shared_with(self) -> list[str]:
        return list(self.weight_shared_with)

    @torch.no_grad()
    def merge(self, names: list[str] | None = None) -> None:
        """Add the adapters' updates into the wrapped weight; merging twice is a no-op."""
        for name in self.active if names is None else names:
            if name not in self.specs or name in self.merged:
                continue
            self.check_mergeable(name)
            if is_quantized(self.base_layer):
                self._merge_requantized(name)
                continue
            weight = self.base_layer.weight
            if self.weight_shared_with and self._shared_weight is None:
                self._shared_weight = weight
                weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
                self.set_base_parameter("weight", weight)
            delta = self.delta_weight(name)
            variant = self.variant_for(name)
            if variant is not None:
                weight.data = variant.merge(self, name, delta)
            else:
                weight.data += delta.to(weight.dtype)
            self.merge_bias(name, 1.0)
            self.merged.append(name)

    def _merge_requantized(self, name: str) -> None:
        """Merge into a quantized base: dequantize, add the update, quantize again.

        Only inside `tilpass.quantize.allow_requantize()` (it changes outputs; otherwise this
        raises before anything changes). The original quantized weight is kept aside and put
        back by `unmerge`, so unmerging is exact.
        """
        delta = self.delta_weight(name)
        variant = self.variant_for(name)
        if variant is not None:
            merged = variant.merge(self, name, delta)
        else:
            merged = self.dense_weight().to(delta.dtype) + delta
        try:
            weight = requantized(self.base_layer, merged)
        except Exception:
            self.variant_state.pop(name, None)
            raise
        if self._shared_weight is None:
            self._shared_weight = self.base_layer.weight
        self.set_base_parameter("weight", weight)
        self.merge_bias(name, 1.0)
        self.merged.append(name)

    def check_mergeable(self, name: str) -> None:
        """Raise if adapter `name` cannot be folded into this layer's weights."""
        if self.lora_bias_of(name) is not None and getattr(self.base_layer, "bias", None) is None:
            self.merge_bias(name, 1.0)  # raises, naming the adapter

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract every merged update again, last merged first."""
        if self._shared_weight is not None:  # the shared (or quantized) tensor was never touched
            self.set_base_parameter("weight", self._shared_weight)
            self._shared_weight = None
            for name in self.merged:
                self.merge_bias(name, -1.0)
            self.merged.clear()
            self.variant_state.clear()
        weight = self.base_layer.weight
        while self.merged:
            name = self.merged.pop()
            self.merge_bias(name, -1.0)
            delta = self.delta_weight(name)
            variant = self.variant_for(name)
            if variant is not None:
                weight.data = variant.unmerge(self, name, delta)
            else:
                weight.data -= delta.to(weight.dtype)

    # -- the mixed path ---------------------------------------------------------------------
    def stacks(self, dtype: torch.dtype) -> list[RankStack]:
        """Every adapter's (A^T, (s B)^T), stacked per rank, so a mix of ranks pays each its own.

        Derived state: cached under no-grad and rebuilt when adapters are added or removed
        (`invalidate`) or any adapter tensor's version moves (an optimizer step, a reload).
        The check is a short loop over integers, since it runs in every layer of every call.
        """
        cache = self._stack_cache
        if (
            cache is not None
            and cache.dtype == dtype
            and all(
                tensor_version(p) == v for p, v in zip(cache.params, cache.versions, strict=True)
            )
        ):
            return cache.stacks
        names = sorted(self.specs, key=self.ids.__getitem__)
        for name in names:
            if self.specs[name].variant is not None and not self.MIXES_VARIANTS:
                raise NotImplementedError(
                    f"adapter {name!r} uses {self.specs[name].variant.name}, which mixed batches "
                    "(adapter_names=...) do not support yet; merge it, or run its rows in a "
                    "batch of their own"
                )
        size = max(self.ids.values(), default=0) + 1
        stacks = []
        for rank in sorted({self.specs[n].r for n in names}):
            group = [n for n in names if self.specs[n].r == rank]
            row_of_id = torch.full((size,), -1, dtype=torch.long)
            row_of_id[[self.ids[n] for n in group]] = torch.arange(len(group))
            pairs = [self.stack_pair(n, dtype) for n in group]
            a_t = torch.stack([p[0] for p in pairs])
            b_t = torch.stack([p[1] for p in pairs])
            stacks.append(RankStack(tuple(self.ids[n] for n in group), row_of_id, a_t, b_t))
        params = [p for n in names for p in self.adapter_parameters(n)]
        if not (torch.is_grad_enabled() and any(p.requires_grad for p in params)):
            self._stack_cache = _StackCache(
                dtype, params, [tensor_version(p) for p in params], stacks
            )
        return stacks

    def rank_groups(
        self, plan: Plan, dtype: torch.dtype
    ) -> list[tuple[Plan, RankStack, torch.Tensor, torch.Tensor]]:
        """(sub-plan, stack, A^T, (s B)^T) for each rank whose adapters occur in the plan;
        A^T and (s B)^T hold the sub-plan's adapters in its group order."""
        out = []
        for stack in self.stacks(dtype):
            sub = plan.subset(stack.ids)
            if sub is None:
                continue
            assert sub.present is not None
            if len(stack.ids) == sub.present.numel():
                out.append((sub, stack, stack.a_t, stack.b_t))
            else:
                rows = stack.rows_for(sub.present)
                out.append((sub, stack, stack.a_t[rows], stack.b_t[rows]))
        return out


def init_factors(a: torch.Tensor, b: torch.Tensor, init: Any, r: int) -> None:
    """Fill A and B in place as PEFT initialises them: A Kaiming-uniform (Gaussian 1/r for
    "gaussian"), B zero (random for `init_lora_weights=False`, so tests cannot pass vacuously);
    `init=None` leaves both empty because every tensor is about to be loaded."""
    if init is None:
        return
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    if init == "gaussian":
        nn.init.normal_(a, std=1 / r)
    if init is False:
        nn.init.kaiming_uniform_(b, a=math.sqrt(5))
    else:
        nn.init.zeros_(b)


def factor_tensors(layer: Any, name: str) -> dict[str, torch.Tensor]:
    """A linear or convolution LoRA layer's tensors of one adapter under PEFT's file keys."""
    if name not in layer.specs:
        return {}
    out = {"lora_A.weight": layer.lora_A[name], "lora_B.weight": layer.lora_B[name]}
    if name in layer.lora_B_bias:
        out["lora_B.bias"] = layer.lora_B_bias[name]
    if name in layer.lora_magnitude_vector:
        out["lora_magnitude_vector"] = layer.lora_magnitude_vector[name]
    return out


class LoraLinear(LoraLayer):
    """LoRA over a linear-like module: y = base(x) + s * dropout(x) A^T B^T.

    `nn.Linear` (W is (out, in)) and GPT-2's `Conv1D` (W is (in, out)) also have a fused path
    that runs base and adapter in fewer kernels; any other linear-like module (a quantized
    linear, say) is called as it is and the adapter term added to its output.
    """

    STORES = ("lora_A", "lora_B", "lora_B_bias", "lora_magnitude_vector")
    STATUS_TYPE = "lora.Linear"
    MIXES_VARIANTS = True

    def __init__(self, base: nn.Module) -> None:
        super().__init__(base)
        self.transposed = is_transposed(base)
        self.in_features, self.out_features = linear_features(base)
        # The fused path multiplies by the weight itself, so it is only for the exact types
        # whose forward is known to be x W^T + b (x W + b for Conv1D).
        self.known_forward = has_plain_linear_forward(base)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_B_bias = nn.ParameterDict()  # lora_bias=True: B's bias (file key lora_B.bias)
        self.lora_magnitude_vector = nn.ParameterDict()
        # mixed batches with DoRA: (key, per-adapter m / ||W + s B A|| table); see dora.py
        self.magnitude_table: tuple[Any, torch.Tensor] | None = None
        self._infer_cache: dict[str, tuple[Any, ...]] = {}  # no-grad operands, per adapter

    def invalidate(self) -> None:
        super().invalidate()
        self._infer_cache.clear()

    def base_bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def weight_out_in(self) -> torch.Tensor:
        """The wrapped weight as (out, in), dense (a quantized base dequantized)."""
        weight = self.dense_weight()
        return weight.T if self.transposed else weight

    def tensor_options(self) -> dict[str, Any]:
        weight = self.base_layer.weight
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        return {"device": weight.device, "dtype": dtype}

    def create(self, name: str, spec: AdapterSpec) -> None:
        """Fresh A, B (and the variant's tensors) on the wrapped weight's device."""
        warn_if_no_base_bias(self.base_layer, spec)
        kw = self.tensor_options()
        a = torch.empty(spec.r, self.in_features, **kw)
        b = torch.empty(self.out_features, spec.r, **kw)
        if reads_weight(spec.init):
            a, b = self._weight_init(spec, kw)
        else:
            init_factors(a, b, spec.init, spec.r)
        self.lora_A[name] = nn.Parameter(a)
        self.lora_B[name] = nn.Parameter(b)
        if spec.lora_bias:
            bias = torch.zeros(self.out_features, **kw)
            if spec.init is False:  # random, as nn.Linear(r, out) initialises its bias
                nn.init.uniform_(bias, -1 / math.sqrt(spec.r), 1 / math.sqrt(spec.r))
            self.lora_B_bias[name] = nn.Parameter(bias)
        self.specs[name] = spec
        if spec.variant is not None:
            spec.variant.create(self, name, spec.init is not None, kw)

    def _weight_init(
        self, spec: AdapterSpec, kw: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A, B for PiSSA / OLoRA / orthogonal (`init.py`); the first two also leave the
        residual in the wrapped weight, as PEFT does."""
        assert isinstance(spec.init, str)
        check_residual_fits(self.base_layer, spec.init)
        a, b, residual = weight_init(spec.init, self.weight_out_in(), spec.r, spec.scale)
        if residual is not None:
            weight = self.base_layer.weight
            weight.data = (residual.T if self.transposed else residual).to(weight.dtype)
        return a.to(**kw), b.to(**kw)

    def lora_bias_of(self, name: str) -> torch.Tensor | None:
        return self.lora_B_bias._parameters.get(name)

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return factor_tensors(self, name)

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Adapter `name`'s (A, B) as the forward multiplies them; a method that keeps the
        update in another form (AdaLoRA's SVD triplets) returns its equivalent pair here."""
        # The dicts' own storage: ParameterDict's item lookup goes through Module.__getattr__,
        # which costs more than the rest of this hot path's Python together.
        return self.lora_A._parameters[name], self.lora_B._parameters[name]  # type: ignore[return-value]

    def delta_weight(self, name: str) -> torch.Tensor:
        a, b = self.factors(name)
        dtype = torch.promote_types(a.dtype, torch.float32)
        delta = (b.to(dtype) @ a.to(dtype)) * self.specs[name].scale  # (out, in)
        return delta.T if self.transposed else delta

    def row_norm(self, delta: torch.Tensor) -> torch.Tensor:
        """||W + delta|| per output row, in delta's dtype (float32 at least)."""
        w = self.dense_weight().to(delta.dtype) + delta
        return torch.linalg.norm(w, dim=0 if self.transposed else 1)  # (out,)

    def per_output(self, values: torch.Tensor) -> torch.Tensor:
        """A per-output-row vector shaped to broadcast over the wrapped weight."""
        return values.view(1, -1) if self.transposed else values.view(-1, 1)

    # -- forward ----------------------------------------------------------------------------
    def adapted_forward(self, x: torch.Tensor, names: list[str], *args: Any, **kw: Any) -> Any:
        if len(names) == 1 and self.known_forward and not (args or kw):
            fused = self.fused_forward(x, names[0])
            if fused is not None:
                return fused
        return super().adapted_forward(x, names, *args, **kw)

    def apply_adapter(self, x: torch.Tensor, result: torch.Tensor, name: str) -> torch.Tensor:
        spec = self.specs[name]
        a, b = self.factors(name)
        dropping = spec.dropout and self.training
        plain = spec.variant is None and not spec.lora_bias
        if plain and not (torch.is_grad_enabled() or dropping) and result.is_contiguous():
            a_t, b_t = self._inference_pair(name, a, b, spec.scale)
            if x.dtype == a_t.dtype == result.dtype:
                h = torch.mm(x.reshape(-1, self.in_features), a_t)  # (n, r)
                result.view(-1, self.out_features).addmm_(h, b_t)  # one fused kernel
                return result
        xd = F.dropout(x, spec.dropout, self.training) if dropping else x
        if spec.variant is not None:
            return spec.variant.apply(self, x, xd, result, name)
        h = F.linear(xd if xd.dtype == a.dtype else xd.to(a.dtype), a)  # (..., r)
        if spec.lora_bias:
            lora = F.linear(h, b, self.lora_B_bias._parameters[name])  # (..., out)
            return result + lora.to(result.dtype) * spec.scale
        if result.dtype != h.dtype or not result.is_contiguous():
            return result + F.linear(h, b).to(result.dtype) * spec.scale
        flat = result.view(-1, self.out_features)  # (n, out)
        if torch.is_grad_enabled():  # out of place: an in-place op on a view costs in backward
            return torch.addmm(flat, h.reshape(-1, spec.r), b.T, alpha=spec.scale).view(
                result.shape
            )
        flat.addmm_(h.reshape(-1, spec.r), b.T, alpha=spec.scale)
        return result

    def fused_forward(self, x: torch.Tensor, name: str) -> torch.Tensor | None:
        """y = b + s (x A^T) B^T first, then the base GEMM accumulates x W^T into y in place.

        Only for an exact `nn.Linear` / `Conv1D` base (whose forward is known). Computing the
        small LoRA product first lets the large GEMM add it for free (BLAS's beta = 1),
        instead of a separate pass over the output. With gradients the same runs as one
        autograd node (`fused.LoraLinearFunction`), which needs a frozen base and no autocast.
        """
        spec = self.specs[name]
        if spec.variant is not None or spec.lora_bias:
            return None
        a, b = self.factors(name)
        w, bias = self.base_layer.weight, self.base_bias()
        if not (x.dtype == a.dtype == w.dtype) or (bias is not None and bias.dtype != w.dtype):
            return None
        dropping = spec.dropout and self.training
        if not torch.is_grad_enabled():
            if dropping:
                return None
            a_t, b_t = self._inference_pair(name, a, b, spec.scale)
            x2d = x.reshape(-1, self.in_features)
            h = torch.mm(x2d, a_t)  # (n, r)
            out = lora_plus_bias(h, b_t, bias)  # (n, out)
            out.addmm_(x2d, w if self.transposed else w.T)
            return out.view(*x.shape[:-1], self.out_features)
        if (
            w.requires_grad
            or (bias is not None and bias.requires_grad)
            or torch.is_autocast_enabled(x.device.type)
        ):
            return None
        xd = F.dropout(x, spec.dropout, True) if dropping else x
        w_t = w if self.transposed else w.T
        out: torch.Tensor = LoraLinearFunction.apply(x, xd, a, b, w_t, bias, spec.scale)
        return out

    def _inference_pair(
        self, name: str, a: torch.Tensor, b: torch.Tensor, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(A^T, (s B)^T), contiguous: BLAS's fastest operand layout, and no alpha to apply.

        Derived state for no-grad forwards, rebuilt when A or B is replaced or changed in
        place (an optimizer step, a reload) or the scale changes.
        """
        hit = self._infer_cache.get(name)
        if (
            hit is not None
            and hit[0] is a
            and hit[1] is b
            and hit[2] == (tensor_version(a), tensor_version(b), scale)
        ):
            return hit[3], hit[4]
        a_t = a.detach().T.contiguous()
        b_t = (b.detach().T * scale).contiguous()
        self._infer_cache[name] = (a, b, (tensor_version(a), tensor_version(b), scale), a_t, b_t)
        return a_t, b_t

    def stack_pair(self, name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        spec = self.specs[name]
        a, b = self.factors(name)
        return a.T.to(dtype), (b.T * spec.scale).to(dtype)

    def mixed_forward(self, x: torch.Tensor, plan: Plan, *args: Any, **kw: Any) -> torch.Tensor:
        weight = self.base_layer.weight
        if any(spec.variant is not None for spec in self.specs.values()):
            return DORA.mixed_forward(self, x, plan, *args, **kw)
        if (
            self.known_forward
            and not (args or kw)
            and x.dtype == weight.dtype
            and not torch.is_autocast_enabled(x.device.type)
        ):
            return self.mixed_fused(x, plan)
        result = self.base_forward(x, *args, **kw)
        x2d = x.reshape(-1, self.in_features)  # (n, in)
        if self.training:
            x2d = token_dropout(x2d, self, plan)
        flat = result.view(-1, self.out_features) if result.is_contiguous() else None
        if flat is None:
            flat = result.reshape(-1, self.out_features).clone()
        for sub, _, a_t, b_t in self.rank_groups(plan, x.dtype):  # one bmm pair per rank
            grouped_lora(x2d, a_t, b_t, sub, flat)
        if self.lora_B_bias:
            flat += self.token_bias(plan, flat.dtype)
        return flat.view(result.shape)

    def mixed_fused(self, x: torch.Tensor, plan: Plan) -> torch.Tensor:
        """The mixed batch in the fused path's order: y = (b + s (x A_g^T) B_g^T) + x W^T.

        The per-token LoRA terms are added onto the bias first and the base GEMM accumulates
        into them, exactly as `fused_forward` does for one adapter, so each row equals its
        adapter's own forward bit for bit (and base rows equal the base layer's).
        """
        w, bias = self.base_layer.weight, self.base_bias()
        x2d = x.reshape(-1, self.in_features)  # (n, in)
        xd = token_dropout(x2d, self, plan) if self.training else x2d
        n = x2d.shape[0]
        if bias is None:
            out = x2d.new_zeros(n, self.out_features)
        else:
            out = bias.to(x2d.dtype).expand(n, self.out_features).clone()  # (n, out)
        for sub, _, a_t, b_t in self.rank_groups(plan, x.dtype):  # one bmm pair per rank
            grouped_lora(xd, a_t, b_t, sub, out)
        if self.lora_B_bias:
            out += self.token_bias(plan, out.dtype)
        out.addmm_(x2d, w if self.transposed else w.T)  # the base GEMM adds itself
        return out.view(*x.shape[:-1], self.out_features)

    def token_bias(self, plan: Plan, dtype: torch.dtype) -> torch.Tensor:
        """(n, out) each token's own adapter's s * bias_B (zero for base tokens and adapters
        without `lora_bias`): one gather from a small per-id table."""
        assert plan.token_ids is not None
        size = max(self.ids.values(), default=0) + 2  # the last row is the base model's (-1)
        table = torch.zeros(size, self.out_features, dtype=dtype, device=plan.token_ids.device)
        for name, bias in self.lora_B_bias.items():
            table[self.ids[name]] = bias.to(dtype) * self.specs[name].scale
        return table[plan.token_ids]


def token_dropout(x2d: torch.Tensor, layer: LoraLayer, plan: Plan) -> torch.Tensor:
    """Dropout on the LoRA input with each token's own adapter's rate (training only)."""
    assert plan.token_ids is not None
    size = max(layer.ids.values(), default=0) + 2  # the last slot is the base model's (-1)
    rates = torch.zeros(size, device=x2d.device, dtype=x2d.dtype)
    for name, adapter_id in layer.ids.items():
        rates[adapter_id] = layer.specs[name].dropout
    if not bool(rates.any()):
        return x2d
    p = rates[plan.token_ids.clamp(max=size - 2)]
    p = torch.where(plan.token_ids >= 0, p, torch.zeros_like(p)).unsqueeze(1)  # (n, 1)
    keep = (torch.rand_like(x2d) >= p).to(x2d.dtype)
    return x2d * keep / (1 - p)
