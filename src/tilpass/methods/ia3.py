"""(IA)^3: learned vectors that rescale activations (Liu et al., 2022, "Few-shot PEFT...").

For a frozen linear layer y = W x + b and an adapter with vector l:

    attention keys / values (and other non-feedforward targets):  y = l * (W x + b),  l (out,)
    the MLP's down projection (a `feedforward_modules` entry):    y = W (l * x) + b,  l (in,)

Several active adapters multiply their vectors. A fresh adapter is all ones, an exact no-op.
Merging folds l into W (columns for feedforward, rows and the bias otherwise); unmerging
divides it out again. Files are PEFT's: `peft_type: "IA3"`, one tensor per layer under
`<module>.ia3_l`, shaped (out, 1) or (1, in) as PEFT shapes it.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch
from torch import nn

from tilpass.config import TargetedConfig
from tilpass.config_fields import opt
from tilpass.errors import TargetModulesError
from tilpass.inject import find_targets
from tilpass.layers import (
    AdapterLayer,
    is_linear_like,
    is_transposed,
    linear_features,
    tensor_version,
)
from tilpass.methods.registry import Method
from tilpass.routing import Plan

# PEFT's defaults per model family: which modules get vectors, and which of them scale inputs.
DEFAULT_TARGETS = {
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mistral": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen3": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
}


@dataclasses.dataclass
class IA3Config(TargetedConfig):
    """(IA)^3 settings, with PEFT's field names and meanings.

    Attributes:
        feedforward_modules: the targets whose *input* is scaled (names, dotted suffixes, or a
            regex); they must be among `target_modules`. Unset for a known model family:
            PEFT's default (the MLP's down projection).
        init_ia3_weights: True = all ones (a no-op at step 0); False = random (tests only).
        Targeting fields are `TargetedConfig`'s; unset `target_modules` take PEFT's default
        for the model family (keys, values and the down projection for Llama).
    """

    PEFT_TYPE = "IA3"

    feedforward_modules: list[str] | str | None = opt(
        None, "Targets whose input is scaled (the MLP down projection); default per family."
    )
    init_ia3_weights: bool = opt(True, "True: vectors of ones (a no-op at step 0).")

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.feedforward_modules, (set, tuple)):
            self.feedforward_modules = sorted(self.feedforward_modules)
        ff, targets = self.feedforward_modules, self.target_modules
        if isinstance(ff, list) and isinstance(targets, list) and not set(ff) <= set(targets):
            raise ValueError(
                f"feedforward_modules {sorted(set(ff) - set(targets))} are not in target_modules "
                f"{targets}; every feedforward module must also be a target"
            )

    def is_feedforward(self, module_name: str) -> bool:
        """PEFT's rule: a regex matches the whole name, a list entry a name's suffix."""
        ff = self.feedforward_modules
        if isinstance(ff, str):
            return re.fullmatch(ff, module_name) is not None
        return any(module_name.endswith(entry) for entry in ff or ())

    def layer_spec(self, module_name: str, initialize: bool) -> IA3Spec:
        return IA3Spec(
            self.is_feedforward(module_name), self.init_ia3_weights if initialize else None
        )


@dataclasses.dataclass(frozen=True)
class IA3Spec:
    """One adapter's settings in one layer."""

    feedforward: bool  # scale the input (l has in_features entries) instead of the output
    init: bool | None = True  # None: allocate only (the tensors are loaded next)


class IA3Linear(AdapterLayer):
    """(IA)^3 over a linear-like module; the formulas are in the module docstring."""

    STORES = ("ia3_l",)
    MERGEABLE = True

    def __init__(self, base: nn.Module) -> None:
        super().__init__(base)
        self.transposed = is_transposed(base)
        self.in_features, self.out_features = linear_features(base)
        self.ia3_l = nn.ParameterDict()
        self._table_cache: tuple[Any, torch.Tensor, torch.Tensor] | None = None

    def create(self, name: str, spec: IA3Spec) -> None:
        weight = self.base_layer.weight
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        shape = (1, self.in_features) if spec.feedforward else (self.out_features, 1)
        vector = torch.ones(shape, dtype=dtype, device=weight.device)
        if spec.init is False:
            nn.init.uniform_(vector, 0.5, 1.5)  # random, yet away from zero (tests only)
        self.ia3_l[name] = nn.Parameter(vector)

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {"ia3_l": self.ia3_l[name]} if name in self.specs else {}

    def scalings(self, names: list[str]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The product of the adapters' input vectors (in,) and output vectors (out,)."""
        scale_in = scale_out = None
        for name in names:
            vector = self.ia3_l[name].flatten()
            if self.specs[name].feedforward:
                scale_in = vector if scale_in is None else scale_in * vector
            else:
                scale_out = vector if scale_out is None else scale_out * vector
        return scale_in, scale_out

    def adapted_forward(self, x: torch.Tensor, names: list[str], *args: Any, **kw: Any) -> Any:
        scale_in, scale_out = self.scalings(names)
        if scale_in is not None:
            x = (x * scale_in).to(x.dtype)  # (..., in)
        result = self.base_forward(x, *args, **kw)
        if scale_out is not None:
            result = (result * scale_out).to(result.dtype)  # (..., out)
        return result

    def mixed_forward(self, x: torch.Tensor, plan: Plan, *args: Any, **kw: Any) -> torch.Tensor:
        """Each token scaled by its own adapter's vectors: a row gather from per-layer tables
        before and after the wrapped module (ones for the base model's tokens)."""
        assert plan.token_ids is not None
        table_in, table_out = self.tables(x.dtype)
        slot = self.slot_of(plan.token_ids, table_in.shape[0] - 1)  # (n,)
        x2d = x.reshape(-1, self.in_features) * table_in[slot]  # (n, in)
        result = self.base_forward(x2d.view(x.shape), *args, **kw)
        out = result.reshape(-1, self.out_features) * table_out[slot]  # (n, out)
        return out.view(result.shape)

    def tables(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(A + 1, in) and (A + 1, out) vectors per adapter slot; the last row is ones (base).

        Derived state: cached under no-grad and rebuilt when adapters are added or removed
        (`invalidate`) or a vector's version moves (an optimizer step, a reload); with
        gradients it is built fresh, so the vectors stay in the autograd graph.
        """
        names = sorted(self.specs, key=self.ids.__getitem__)
        params = [self.ia3_l[name] for name in names]
        key = (dtype, tuple(id(p) for p in params), tuple(tensor_version(p) for p in params))
        if self._table_cache is not None and self._table_cache[0] == key:
            return self._table_cache[1], self._table_cache[2]
        weight = self.base_layer.weight
        ones_in = torch.ones(self.in_features, dtype=dtype, device=weight.device)
        ones_out = torch.ones(self.out_features, dtype=dtype, device=weight.device)
        rows_in, rows_out = [], []
        for name, param in zip(names, params, strict=True):
            vector = param.flatten().to(dtype)
            feedforward = self.specs[name].feedforward
            rows_in.append(vector if feedforward else ones_in)
            rows_out.append(ones_out if feedforward else vector)
        table_in, table_out = torch.stack([*rows_in, ones_in]), torch.stack([*rows_out, ones_out])
        if not (torch.is_grad_enabled() and any(p.requires_grad for p in params)):
            self._table_cache = (key, table_in, table_out)
        return table_in, table_out

    def invalidate(self) -> None:
        self._table_cache = None

    def slot_of(self, token_ids: torch.Tensor, base_slot: int) -> torch.Tensor:
        """Each token's row in `tables` (adapters this layer lacks use the base row)."""
        names = sorted(self.specs, key=self.ids.__getitem__)
        size = max(max(self.ids.values()), int(token_ids.max())) + 1
        lookup = torch.full((size + 1,), base_slot, dtype=torch.long, device=token_ids.device)
        for slot, name in enumerate(names):
            lookup[self.ids[name]] = slot
        return lookup[torch.where(token_ids >= 0, token_ids, size)]

    # -- merging ----------------------------------------------------------------------------
    def merge_targets(self) -> list[str]:
        return ["weight", "bias"]

    def _weight_factor(self, name: str) -> torch.Tensor:
        """l shaped to broadcast over the stored weight ((out, in), or (in, out) for Conv1D)."""
        vector = self.ia3_l[name].flatten()
        along_in = self.specs[name].feedforward
        if along_in != self.transposed:
            return vector.view(1, -1)
        return vector.view(-1, 1)

    @torch.no_grad()
    def merge(self, names: list[str] | None = None) -> None:
        base = self.base_layer
        for name in self.active if names is None else names:
            if name not in self.specs or name in self.merged:
                continue
            base.weight.data = (base.weight * self._weight_factor(name)).to(base.weight.dtype)
            bias = getattr(base, "bias", None)
            if bias is not None and not self.specs[name].feedforward:
                bias.data = (bias * self.ia3_l[name].flatten()).to(bias.dtype)
            self.merged.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        base = self.base_layer
        while self.merged:
            name = self.merged.pop()
            base.weight.data = (base.weight / self._weight_factor(name)).to(base.weight.dtype)
            bias = getattr(base, "bias", None)
            if bias is not None and not self.specs[name].feedforward:
                bias.data = (bias / self.ia3_l[name].flatten()).to(bias.dtype)


def make_layer(module: nn.Module) -> IA3Linear:
    """Wrap a linear-like module, or raise naming the unsupported type."""
    if not is_linear_like(module):
        raise TypeError(
            f"(IA)^3 supports torch.nn.Linear (and linear-like layers) and transformers Conv1D, "
            f"not {type(module).__name__}"
        )
    return IA3Linear(module)


def select_targets(model: nn.Module, config: IA3Config) -> list[str]:
    """PEFT's defaults for the model family when targets are unset, then name matching."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    default = DEFAULT_TARGETS.get(str(model_type))
    if config.target_modules is None or config.feedforward_modules is None:
        if default is None:
            raise TargetModulesError(
                f"(IA)^3 has no default targets for model type {model_type!r}; set "
                "target_modules and feedforward_modules (known: "
                f"{', '.join(sorted(DEFAULT_TARGETS))})"
            )
        if config.target_modules is None:
            config.target_modules = list(default[0])
        if config.feedforward_modules is None:
            config.feedforward_modules = list(default[1])
    return find_targets(model, config)


METHOD = Method(
    name="ia3",
    config_class=IA3Config,
    make_layer=make_layer,
    description="(IA)^3: learned vectors scaling keys, values and the MLP's down projection",
    select_targets=select_targets,
    prefix="ia3_",
)
