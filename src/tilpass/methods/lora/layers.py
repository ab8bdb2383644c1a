"""The LoRA layers: one object per wrapped module, holding any number of named adapters.

`LoraLinear` wraps `nn.Linear` and GPT-2's `Conv1D`, `LoraEmbedding` wraps `nn.Embedding`; the
shared base class `LoraLayer` keeps the adapters, their activation, merging and the routing of
mixed batches. The formulas are in the package docstring (`tilpass.methods.lora`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from tilpass.methods.lora.fused import LoraLinearFunction
from tilpass.routing import Router, grouped_b, grouped_lora

try:  # GPT-2's transposed linear layer; optional so non-transformers models need nothing.
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = None  # type: ignore[assignment,misc]


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    """One adapter's settings as resolved for one layer (after rank/alpha patterns)."""

    r: int
    alpha: float
    dropout: float = 0.0
    use_rslora: bool = False
    use_dora: bool = False
    init: bool | str | None = True  # None: allocate only (the tensors are loaded next)

    @property
    def scale(self) -> float:
        """The factor in front of B A."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


@dataclasses.dataclass
class _StackCache:
    """The stacked adapters of one layer and what they were built from."""

    names: list[str]
    dtype: torch.dtype
    params: list[nn.Parameter]
    versions: list[int]
    tensors: tuple[torch.Tensor, ...]


class LoraLayer(nn.Module):
    """State shared by the LoRA layer kinds: named adapters, activation, merging, routing."""

    A_KEY = "lora_A"
    B_KEY = "lora_B"

    def __init__(self, base: nn.Module, router: Router | None) -> None:
        super().__init__()
        # The base module keeps its configuration (sizes, padding_idx); its parameters move
        # here under the same names, so state-dict keys do not change. It is held in a tuple
        # so that it is not registered as a child (its parameters would show up twice).
        self._shell: tuple[nn.Module] = (base,)
        self.weight = base.weight
        self.bias = getattr(base, "bias", None)
        self._bias_slot = "bias" in base._parameters  # Linear(bias=False) registers None
        del base._parameters["weight"]
        if self._bias_slot:
            del base._parameters["bias"]
        self.router = router
        self.specs: dict[str, AdapterSpec] = {}
        self.active: list[str] = []
        self.merged: list[str] = []
        self.disabled = False
        self.lora_magnitude_vector = nn.ParameterDict()
        self._merge_norms: dict[str, torch.Tensor] = {}
        self._stack_cache: _StackCache | None = None
        self._infer_cache: dict[str, tuple[Any, ...]] = {}  # no-grad operands, per adapter
        # Set by the model before merging when another module uses the same weight tensor
        # (GPT-2's wte is lm_head's weight): merging then works on a private copy, so the
        # other module keeps the base weight, and unmerging puts the shared tensor back.
        self.weight_shared_with: list[str] = []
        self._shared_weight: nn.Parameter | None = None

    # -- what each kind provides ------------------------------------------------------------
    def base_forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def delta_weight(self, name: str) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def lora_a(self) -> nn.ParameterDict:
        return getattr(self, self.A_KEY)

    @property
    def lora_b(self) -> nn.ParameterDict:
        return getattr(self, self.B_KEY)

    # -- adapters ---------------------------------------------------------------------------
    def unwrap(self) -> nn.Module:
        """Give the base module its parameters back and return it (used by `unload`)."""
        base = self._shell[0]
        base.weight = self.weight
        if self._bias_slot:
            base.register_parameter("bias", self.bias)
        return base

    def delete(self, name: str) -> None:
        """Remove every trace of adapter `name` from this layer."""
        if name in self.merged:
            raise RuntimeError(f"adapter {name!r} is merged into the weights; unmerge it first")
        for store in (self.lora_a, self.lora_b, self.lora_magnitude_vector):
            if name in store:
                del store[name]
        self.specs.pop(name, None)
        self.active = [a for a in self.active if a != name]
        self._stack_cache = None
        self._infer_cache.pop(name, None)

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """This layer's tensors of adapter `name`, keyed as PEFT's files key them."""
        if name not in self.specs:
            return {}
        out = {
            self.file_key(self.A_KEY): self.lora_a[name],
            self.file_key(self.B_KEY): self.lora_b[name],
        }
        if name in self.lora_magnitude_vector:
            out["lora_magnitude_vector"] = self.lora_magnitude_vector[name]
        return out

    def file_key(self, key: str) -> str:
        """PEFT's file suffix for a parameter: Linear's are modules (`lora_A.weight`)."""
        return f"{key}.weight"

    @torch.no_grad()
    def load_adapter_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Copy file tensors into adapter `name`; shapes were checked by the caller."""
        targets = self.adapter_tensors(name)
        for key, value in tensors.items():
            targets[key].copy_(value)
        self._stack_cache = None

    # -- forward ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return self.base_forward(x)
        router = self.router
        if router is not None and router.row_ids is not None:
            plan = router.plan(self.rows(x), x.device)
            if plan.single is None:
                return self.mixed_forward(x, self.base_forward(x), plan)
            names = [router.names[plan.single]] if plan.single >= 0 else []
        else:
            names = self.active
        if len(names) == 1:
            fused = self.fused_forward(x, names[0])
            if fused is not None:
                return fused
        result = self.base_forward(x)
        for name in names:
            if name in self.specs and name not in self.merged:
                result = self.add_lora(x, result, name)
        return result

    def add_lora(self, x: torch.Tensor, result: torch.Tensor, name: str) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover

    def rows(self, x: torch.Tensor) -> int:
        """How many rows (tokens) of output `x` makes: the router's plan is per row."""
        return x.numel() // x.shape[-1]

    def fused_forward(self, x: torch.Tensor, name: str) -> torch.Tensor | None:
        """The whole layer with one adapter in fewer kernels, or None when this layer kind or
        case has no such path (the caller then composes base and adapter ops)."""
        return None

    def mixed_forward(self, x: torch.Tensor, result: torch.Tensor, plan: Any) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover

    def stacked(self, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """(A^T, (s B)^T) of every router adapter stacked by global id; zeros where absent.

        Derived state: cached under no-grad, and rebuilt when the router's adapter list is
        replaced or any adapter tensor's version moves (an optimizer step, a reload). The
        check is a short loop over integers, since it runs in every layer of every forward.
        """
        assert self.router is not None
        names = self.router.names
        cache = self._stack_cache
        if (
            cache is not None
            and cache.names is names
            and cache.dtype == dtype
            and all(p._version == v for p, v in zip(cache.params, cache.versions, strict=True))
        ):
            return cache.tensors
        params = [p for n in names if n in self.specs for p in (self.lora_a[n], self.lora_b[n])]
        stacks = self.build_stack(names, dtype)
        if not (torch.is_grad_enabled() and any(p.requires_grad for p in params)):
            self._stack_cache = _StackCache(
                names, dtype, params, [p._version for p in params], stacks
            )
        return stacks

    def build_stack(self, names: list[str], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        rank = max((self.specs[n].r for n in names if n in self.specs), default=1)
        a_list, b_list = [], []
        for n in names:
            a, b = self.stack_pair(n, rank, dtype)
            a_list.append(a)
            b_list.append(b)
        return torch.stack(a_list), torch.stack(b_list)

    def stack_pair(
        self, name: str, rank: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One adapter's (A^T, (s B)^T), zero-padded to `rank`; zeros if absent here."""
        raise NotImplementedError  # pragma: no cover

    # -- merging ----------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, names: list[str] | None = None) -> None:
        """Add the adapters' updates into the base weight; merging twice is a no-op."""
        for name in self.active if names is None else names:
            if name not in self.specs or name in self.merged:
                continue
            if self.weight_shared_with and self._shared_weight is None:
                self._shared_weight = self.weight
                self.weight = nn.Parameter(self.weight.detach().clone(), requires_grad=False)
            delta = self.delta_weight(name)
            if self.specs[name].use_dora:
                norm = self.dora_norm(delta)
                self._merge_norms[name] = norm
                factor = self.dora_factor(self.lora_magnitude_vector[name] / norm)
                self.weight.data = (factor * (self.weight.to(delta.dtype) + delta)).to(
                    self.weight.dtype
                )
            else:
                self.weight.data += delta.to(self.weight.dtype)
            self.merged.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract every merged update again, last merged first."""
        if self._shared_weight is not None:  # the shared tensor was never touched
            self.weight = self._shared_weight
            self._shared_weight = None
            self.merged.clear()
            self._merge_norms.clear()
        while self.merged:
            name = self.merged.pop()
            delta = self.delta_weight(name)
            if self.specs[name].use_dora:
                norm = self._merge_norms.pop(name)
                factor = self.dora_factor(self.lora_magnitude_vector[name] / norm)
                self.weight.data = (self.weight.to(delta.dtype) / factor - delta).to(
                    self.weight.dtype
                )
            else:
                self.weight.data -= delta.to(self.weight.dtype)

    def dora_norm(self, delta: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover

    def dora_factor(self, per_output: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover


class LoraLinear(LoraLayer):
    """LoRA over `nn.Linear` (W is (out, in)) or GPT-2's `Conv1D` (W is (in, out)).

    y = x W^T + b + s * dropout(x) A^T B^T, with DoRA's per-row rescaling when enabled.
    """

    def __init__(self, base: nn.Module, router: Router | None = None) -> None:
        super().__init__(base, router)
        self.transposed = Conv1D is not None and isinstance(base, Conv1D)
        w = self.weight
        self.in_features, self.out_features = (
            (w.shape[0], w.shape[1]) if self.transposed else (w.shape[1], w.shape[0])
        )
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.transposed:  # exactly Conv1D.forward, so disabled == base bit for bit
            shape = (*x.shape[:-1], self.out_features)
            return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(shape)
        return F.linear(x, self.weight, self.bias)

    def add(self, name: str, spec: AdapterSpec) -> None:
        """Create adapter `name` with fresh A, B (and magnitude for DoRA) on the weight's device."""
        w = self.weight
        kw: dict[str, Any] = {
            "device": w.device,
            "dtype": w.dtype if w.is_floating_point() else None,
        }
        a = torch.empty(spec.r, self.in_features, **kw)
        b = torch.empty(self.out_features, spec.r, **kw)
        if spec.init is not None:  # None: left empty, every tensor is about to be loaded
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            if spec.init == "gaussian":
                nn.init.normal_(a, std=1 / spec.r)
            if spec.init is False:
                nn.init.kaiming_uniform_(b, a=math.sqrt(5))
            else:
                nn.init.zeros_(b)
        self.lora_A[name] = nn.Parameter(a)
        self.lora_B[name] = nn.Parameter(b)
        self.specs[name] = spec
        if spec.use_dora:
            norm = torch.empty(self.out_features, **kw)
            if spec.init is not None:
                with torch.no_grad():
                    norm = self.dora_norm(self.delta_weight(name)).to(a.dtype)
            self.lora_magnitude_vector[name] = nn.Parameter(norm)
        self._stack_cache = None

    def delta_weight(self, name: str) -> torch.Tensor:
        """s * B A in the base weight's layout, computed in float32 at least."""
        a, b = self.lora_A[name], self.lora_B[name]
        dtype = torch.promote_types(a.dtype, torch.float32)
        delta = (b.to(dtype) @ a.to(dtype)) * self.specs[name].scale  # (out, in)
        return delta.T if self.transposed else delta

    def dora_norm(self, delta: torch.Tensor) -> torch.Tensor:
        """||W + delta|| per output row, in float32."""
        w = self.weight.to(delta.dtype) + delta
        return torch.linalg.norm(w, dim=0 if self.transposed else 1)  # (out,)

    def dora_factor(self, per_output: torch.Tensor) -> torch.Tensor:
        return per_output.view(1, -1) if self.transposed else per_output.view(-1, 1)

    def add_lora(self, x: torch.Tensor, result: torch.Tensor, name: str) -> torch.Tensor:
        spec = self.specs[name]
        # The dicts' own storage: ParameterDict's item lookup goes through Module.__getattr__,
        # which costs more than the rest of this hot path's Python together.
        a, b = self.lora_A._parameters[name], self.lora_B._parameters[name]
        dropping = spec.dropout and self.training
        if not (torch.is_grad_enabled() or spec.use_dora or dropping) and result.is_contiguous():
            a_t, b_t = self._inference_pair(name, a, b, spec.scale)
            if x.dtype == a_t.dtype == result.dtype:
                h = torch.mm(x.reshape(-1, self.in_features), a_t)  # (n, r)
                result.view(-1, self.out_features).addmm_(h, b_t)  # one fused kernel
                return result
        xd = F.dropout(x, spec.dropout, self.training) if dropping else x
        if spec.use_dora:
            return self._add_dora(x, xd, result, name)
        h = F.linear(xd if xd.dtype == a.dtype else xd.to(a.dtype), a)  # (..., r)
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

        Computing the small LoRA product first lets the large GEMM add it for free (BLAS's
        beta = 1), instead of a separate pass that reads and writes the output again. With
        gradients the same runs as one autograd node (`fused.LoraLinearFunction`), which
        needs a frozen base and no autocast; DoRA always composes its ops.
        """
        spec = self.specs.get(name)
        if spec is None or name in self.merged or spec.use_dora:
            return None
        a, b = self.lora_A._parameters[name], self.lora_B._parameters[name]
        w, bias = self.weight, self.bias
        if not (x.dtype == a.dtype == w.dtype) or (bias is not None and bias.dtype != w.dtype):
            return None
        dropping = spec.dropout and self.training
        if not torch.is_grad_enabled():
            if dropping:
                return None
            a_t, b_t = self._inference_pair(name, a, b, spec.scale)
            x2d = x.reshape(-1, self.in_features)
            h = torch.mm(x2d, a_t)  # (n, r)
            out = torch.mm(h, b_t) if bias is None else torch.addmm(bias, h, b_t)  # (n, out)
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
        place (an optimizer step, a reload) or the scale changes. Used only without
        gradients, DoRA or active dropout.
        """
        hit = self._infer_cache.get(name)
        if (
            hit is not None
            and hit[0] is a
            and hit[1] is b
            and hit[2] == (a._version, b._version, scale)
        ):
            return hit[3], hit[4]
        a_t = a.detach().T.contiguous()
        b_t = (b.detach().T * scale).contiguous()
        self._infer_cache[name] = (a, b, (a._version, b._version, scale), a_t, b_t)
        return a_t, b_t

    def _add_dora(
        self, x: torch.Tensor, xd: torch.Tensor, result: torch.Tensor, name: str
    ) -> torch.Tensor:
        spec = self.specs[name]
        a, b = self.lora_A[name], self.lora_B[name]
        norm = self.dora_norm(self.delta_weight(name).detach()).detach()  # paper, section 4.3
        mag = (self.lora_magnitude_vector[name] / norm).to(result.dtype)  # (out,)
        lora = F.linear(F.linear(xd.to(a.dtype), a), b).to(result.dtype) * spec.scale
        if xd is x:
            base = result if self.bias is None else result - self.bias
        else:  # with dropout, the base term is recomputed on the dropped input (as PEFT does)
            w = self.weight.T if self.transposed else self.weight
            base = F.linear(xd, w)
        return result + (mag - 1) * base + mag * lora

    def stack_pair(
        self, name: str, rank: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.weight
        a_t = w.new_zeros(self.in_features, rank, dtype=dtype)
        b_t = w.new_zeros(rank, self.out_features, dtype=dtype)
        if name in self.specs:
            spec = self.specs[name]
            if spec.use_dora:
                raise NotImplementedError(
                    f"adapter {name!r} uses DoRA, which mixed batches (adapter_names=...) do not "
                    "support yet; merge it, or run its rows in a batch of their own"
                )
            a_t = torch.cat([self.lora_A[name].T.to(dtype), a_t[:, spec.r :]], dim=1)
            b_t = torch.cat([(self.lora_B[name].T * spec.scale).to(dtype), b_t[spec.r :]], dim=0)
        return a_t, b_t

    def mixed_forward(self, x: torch.Tensor, result: torch.Tensor, plan: Any) -> torch.Tensor:
        a_t, b_t = self.stacked(x.dtype)
        x2d = x.reshape(-1, self.in_features)  # (n, in)
        if self.training:
            x2d = _token_dropout(x2d, self, plan)
        flat = result.view(-1, self.out_features) if result.is_contiguous() else None
        if flat is None:
            flat = result.reshape(-1, self.out_features).clone()
        grouped_lora(x2d, a_t, b_t, plan, flat)
        return flat.view(result.shape)


class LoraEmbedding(LoraLayer):
    """LoRA over `nn.Embedding`: y = W[ids] + s * A^T[ids] B^T (A is (r, vocab), B (dim, r))."""

    A_KEY = "lora_embedding_A"
    B_KEY = "lora_embedding_B"

    def __init__(self, base: nn.Embedding, router: Router | None = None) -> None:
        super().__init__(base, router)
        self.num_embeddings, self.embedding_dim = self.weight.shape
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def rows(self, x: torch.Tensor) -> int:
        return x.numel()  # one output row per token id

    def _embed(self, ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        base = self._shell[0]
        return F.embedding(
            ids,
            table,
            base.padding_idx,
            base.max_norm,
            base.norm_type,
            base.scale_grad_by_freq,
            base.sparse,
        )

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._embed(x, self.weight)

    def file_key(self, key: str) -> str:
        return key  # PEFT stores embedding LoRA factors as bare parameters

    def add(self, name: str, spec: AdapterSpec) -> None:
        """Create adapter `name`: A zero and B normal (PEFT's embedding init), or both random."""
        if spec.use_dora:
            raise NotImplementedError(
                "DoRA is supported for Linear and Conv1D layers, not Embedding"
            )
        kw: dict[str, Any] = {"device": self.weight.device, "dtype": self.weight.dtype}
        a = torch.empty(spec.r, self.num_embeddings, **kw)
        b = torch.empty(self.embedding_dim, spec.r, **kw)
        if spec.init is not None:  # None: left empty, every tensor is about to be loaded
            nn.init.normal_(a)
            nn.init.normal_(b)
            if spec.init is not False:
                nn.init.zeros_(a)
        self.lora_embedding_A[name] = nn.Parameter(a)
        self.lora_embedding_B[name] = nn.Parameter(b)
        self.specs[name] = spec
        self._stack_cache = None

    def delta_weight(self, name: str) -> torch.Tensor:
        a, b = self.lora_embedding_A[name], self.lora_embedding_B[name]
        dtype = torch.promote_types(a.dtype, torch.float32)
        return (b.to(dtype) @ a.to(dtype)).T * self.specs[name].scale  # (vocab, dim)

    def add_lora(self, x: torch.Tensor, result: torch.Tensor, name: str) -> torch.Tensor:
        a, b = self.lora_embedding_A[name], self.lora_embedding_B[name]
        h = self._embed(x, a.T)  # (..., r)
        return result + F.linear(h, b).to(result.dtype) * self.specs[name].scale

    def stack_pair(
        self, name: str, rank: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        a_t = self.weight.new_zeros(self.num_embeddings, rank, dtype=dtype)
        b_t = self.weight.new_zeros(rank, self.embedding_dim, dtype=dtype)
        if name in self.specs:
            spec = self.specs[name]
            a_t = torch.cat([self.lora_embedding_A[name].T.to(dtype), a_t[:, spec.r :]], dim=1)
            b_t = torch.cat([(self.lora_embedding_B[name].T * spec.scale).to(dtype), b_t[spec.r :]])
        return a_t, b_t

    def mixed_forward(self, x: torch.Tensor, result: torch.Tensor, plan: Any) -> torch.Tensor:
        a_t, b_t = self.stacked(result.dtype)  # (G, vocab, r), (G, r, dim)
        ids = x.reshape(-1)
        h = a_t[plan.token_ids.clamp(min=0), ids]  # (n, r): each token's own adapter row
        flat = result.reshape(-1, self.embedding_dim)
        if not result.is_contiguous():
            flat = flat.clone()
        grouped_b(h, b_t, plan, flat)
        return flat.view(result.shape)

    def dora_norm(self, delta: torch.Tensor) -> torch.Tensor:  # pragma: no cover - guarded
        raise NotImplementedError


def _token_dropout(x2d: torch.Tensor, layer: LoraLayer, plan: Any) -> torch.Tensor:
    """Dropout on the LoRA input with each token's own adapter's rate (training only)."""
    assert layer.router is not None
    rates = torch.tensor(
        [layer.specs[n].dropout if n in layer.specs else 0.0 for n in layer.router.names] + [0.0],
        device=x2d.device,
        dtype=x2d.dtype,
    )
    if not bool(rates.any()):
        return x2d
    p = rates[plan.token_ids].unsqueeze(1)  # (n, 1); id -1 picks the trailing 0
    keep = (torch.rand_like(x2d) >= p).to(x2d.dtype)
    return x2d * keep / (1 - p)


def make_layer(module: nn.Module, router: Router | None) -> LoraLayer:
    """Wrap a supported module in its LoRA layer, or raise naming the unsupported type."""
    if isinstance(module, nn.Linear) or (Conv1D is not None and isinstance(module, Conv1D)):
        return LoraLinear(module, router)
    if isinstance(module, nn.Embedding):
        return LoraEmbedding(module, router)
    raise TypeError(
        f"LoRA supports torch.nn.Linear, transformers Conv1D and torch.nn.Embedding, "
        f"not {type(module).__name__}"
    )


LAYER_TYPES: tuple[type[LoraLayer], ...] = (LoraLinear, LoraEmbedding)
LayerKind = Literal["linear", "embedding"]
