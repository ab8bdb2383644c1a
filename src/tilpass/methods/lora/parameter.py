"""LoRA on bare parameters: `target_parameters` (mixture-of-experts weights) and
`nn.MultiheadAttention` (its `in_proj_weight` and `out_proj.weight`; `attention.py`), with
PEFT's semantics.

Such modules use their weights directly (`x @ W` in a batched expert matmul, or inside
`F.multi_head_attention_forward`), so there is no linear layer to hook. The layer runs the
wrapped module with each targeted parameter replaced by W + dW for that call
(`torch.func.functional_call`: nothing is written into the module, and gradients reach A
and B); merging adds dW into W in place. A parametrized parameter (`torch.nn.utils.parametrize`)
gets its parametrized value plus dW, as in PEFT, through one more parametrization step added
for the call; merging into it is refused (its stored tensor is not the weight used).

For a 2-d parameter W (out, in): dW = s B A with A (r, in), B (out, r), as for a Linear.
For a 3-d parameter W (E, d1, d2) (E experts): A is (E r, d2) and B (d1, E r), interleaved as
PEFT does, and dW[e, o, i] = s * sum_k B[o, k E + e] A[e r + k, i].

File keys are PEFT's. PEFT nests one wrapper per targeted parameter, so with several targets
on one module the first registered parameter's factors sit under the most `base_layer.`
prefixes; a MultiheadAttention's out_proj factors sit under `base_layer.out_proj.`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.utils import parametrize

from tilpass.errors import TargetModulesError
from tilpass.inject import matches_target
from tilpass.layers import AdapterLayer
from tilpass.methods.lora.layers import AdapterSpec, init_factors


@dataclasses.dataclass(frozen=True)
class ParamTarget:
    """One targeted parameter of the wrapped module and the factors' shapes and file keys."""

    path: str  # the parameter's name inside the wrapped module ("out_proj.weight")
    key: str  # file-key prefix of its factors ("", "base_layer.", "base_layer.out_proj.")
    experts: int  # E for a 3-d parameter, 1 for a 2-d one
    in_features: int
    out_features: int


def target_for(module: nn.Module, path: str, key: str) -> ParamTarget:
    """The target for parameter `path` of `module`, or a ValueError for other shapes."""
    shape = tuple(tensor_at(module, path).shape)
    if len(shape) == 2:
        return ParamTarget(path, key, 1, shape[1], shape[0])
    if len(shape) == 3:  # (E, d1, d2): PEFT swaps in and out for expert weights
        return ParamTarget(path, key, shape[0], shape[2], shape[1])
    raise ValueError(f"LoRA on parameter {path!r} needs a 2-d or 3-d parameter, got {shape}")


class LoraParameters(AdapterLayer):
    """Runs a module with W + s B A in place of each targeted parameter W.

    Args:
        base: the module that owns the parameters.
        targets: the parameters, with their file-key prefixes.
    """

    MERGEABLE = True

    def __init__(self, base: nn.Module, targets: list[ParamTarget], dropout_ok: bool) -> None:
        super().__init__(base)
        self.targets = targets
        self.dropout_ok = dropout_ok  # MultiheadAttention ignores lora_dropout, as PEFT does
        self.STORES = tuple(f"lora_{ab}_{i}" for i in range(len(targets)) for ab in "AB")
        for store in self.STORES:
            setattr(self, store, nn.ParameterDict())

    @property
    def status_type(self) -> str:
        """PEFT's name in status reports: its MultiheadAttention layer, or its wrapper of
        `target_parameters`."""
        if isinstance(self.base_layer, nn.MultiheadAttention):
            return "lora.MultiheadAttention"
        return "lora.ParamWrapper"

    def targeted_parameters(self) -> list[str]:
        """The parameters `target_parameters` named (none for a MultiheadAttention, which
        `target_modules` adapts)."""
        if isinstance(self.base_layer, nn.MultiheadAttention):
            return []
        return [t.path for t in self.targets]

    def factors(self, i: int) -> tuple[nn.ParameterDict, nn.ParameterDict]:
        """(A, B) dicts of target `i`, keyed by adapter name."""
        return getattr(self, f"lora_A_{i}"), getattr(self, f"lora_B_{i}")

    def create(self, name: str, spec: AdapterSpec) -> None:
        """Fresh A, B for every target, initialised as a Linear layer's LoRA."""
        kind = type(self.base_layer).__name__
        if spec.variant is not None:
            raise ValueError(
                f"{kind} does not support DoRA (yet), please set use_dora to False (LoRA on "
                "its bare parameters has no DoRA form, as in PEFT)"
            )
        refused = {
            "lora_dropout": spec.dropout and not self.dropout_ok,
            "lora_bias": spec.lora_bias,
            "PiSSA / OLoRA / orthogonal init": isinstance(spec.init, str)
            and spec.init != "gaussian",
        }
        for what, value in refused.items():
            if value:
                raise ValueError(
                    f"LoRA on the parameters of {kind} does not support {what} (as in PEFT)"
                )
        for i, t in enumerate(self.targets):
            weight = tensor_at(self.base_layer, t.path)
            kw: dict[str, Any] = {"device": weight.device, "dtype": weight.dtype}
            a = torch.empty(spec.r * t.experts, t.in_features, **kw)
            b = torch.empty(t.out_features, spec.r * t.experts, **kw)
            init_factors(a, b, spec.init, spec.r)
            store_a, store_b = self.factors(i)
            store_a[name] = nn.Parameter(a)
            store_b[name] = nn.Parameter(b)

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self.specs:
            return {}
        out = {}
        for i, t in enumerate(self.targets):
            store_a, store_b = self.factors(i)
            out[f"{t.key}lora_A.weight"] = store_a[name]
            out[f"{t.key}lora_B.weight"] = store_b[name]
        return out

    def delta(self, i: int, name: str) -> torch.Tensor:
        """s * B A for target `i` in its parameter's shape (and dtype)."""
        t = self.targets[i]
        store_a, store_b = self.factors(i)
        a, b = store_a[name], store_b[name]
        scale = self.specs[name].scale
        if t.experts == 1:
            return (b @ a) * scale  # (out, in)
        e = t.experts
        a3 = a.reshape(e, -1, t.in_features)  # (E, r, d2): row e r + k
        b3 = b.reshape(t.out_features, -1, e)  # (d1, r, E): column k E + e
        return torch.einsum("ore,eri->eoi", b3, a3) * scale  # (E, d1, d2)

    def adapted_forward(self, x: Any, names: list[str], *args: Any, **kwargs: Any) -> Any:
        params = {}
        with contextlib.ExitStack() as stack:
            for i, t in enumerate(self.targets):
                delta = sum(self.delta(i, n) for n in names)
                steps = parametrizations_of(self.base_layer, t.path)
                if steps is not None:  # after the module's own steps, for this call only
                    stack.enter_context(_added_step(steps, AddDelta(delta)))
                    continue
                weight = tensor_at(self.base_layer, t.path)
                params[t.path] = weight + delta.to(weight.dtype)
            return functional_call(self.base_layer, params, (x, *args), kwargs)

    @torch.no_grad()
    def merge(self, names: list[str] | None = None) -> None:
        """Add the adapters' updates into the parameters; merging twice is a no-op."""
        for name in self.active if names is None else names:
            if name not in self.specs or name in self.merged:
                continue
            for i, t in enumerate(self.targets):
                weight = stored_parameter(self.base_layer, t.path)
                weight.data += self.delta(i, name).to(weight.dtype)
            self.merged.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract every merged update again, last merged first."""
        while self.merged:
            name = self.merged.pop()
            for i, t in enumerate(self.targets):
                weight = stored_parameter(self.base_layer, t.path)
                weight.data -= self.delta(i, name).to(weight.dtype)


def for_parameters(module: nn.Module, names: list[str]) -> LoraParameters:
    """LoRA on the parameters `names` of `module`, keyed as PEFT's nested wrappers key them."""
    order = [n for n in own_parameter_names(module) if n in names]
    targets = [
        target_for(module, n, "base_layer." * (len(order) - 1 - i)) for i, n in enumerate(order)
    ]
    return LoraParameters(module, targets, dropout_ok=False)


def parameter_owners(
    model: nn.Module, entries: list[str], strict: bool = True
) -> dict[str, list[str]]:
    """Module name -> its parameters that `entries` name (PEFT's rule: the full parameter name
    or a dotted suffix of it); raises if an entry names no parameter, unless `strict` is False
    and no entry matches at all (the caller then decides, as PEFT does, between an error and
    a warning)."""
    if isinstance(entries, str):
        raise TypeError("target_parameters must be a list of parameter names, not a string")
    owners: dict[str, list[str]] = {}
    found: set[str] = set()
    for module_name, module in model.named_modules():
        for param_name in own_parameter_names(module):
            full = f"{module_name}.{param_name}" if module_name else param_name
            hits = [e for e in entries if full == e or full.endswith("." + e)]
            if hits:
                if not module_name:
                    raise ValueError(
                        "Targeting an nn.Parameter on the top-level module is not supported "
                        f"(parameter {param_name!r}). target_parameters {hits} name it; only "
                        "parameters of submodules can be adapted (the module holding the "
                        "parameter is wrapped in its place)"
                    )
                owners.setdefault(module_name, []).append(param_name)
                found.update(hits)
    missing = [e for e in entries if e not in found]
    if missing and (strict or found):
        raise ValueError(f"target_parameters {missing} match no parameter of the model")
    return owners


def check_parameter_owner(
    model: nn.Module, name: str, target_modules: list[str] | str | None
) -> None:
    """Raise if module `name`, whose parameters `target_parameters` names, is also a module
    target (of this adapter, or already wrapped by another adapter's layer): its parameters
    cannot be adapted twice (PEFT's rule and message)."""
    module = model.get_submodule(name)
    wrapped = isinstance(module, AdapterLayer) and not isinstance(module, LoraParameters)
    base = module.base_layer if isinstance(module, AdapterLayer) else module
    if wrapped or matches_target(name, base, target_modules):
        raise TargetModulesError(
            f"Trying to wrap an `nn.Parameter` of layer '{name}' of type {type(base).__name__}, "
            "which is not a valid target. Make sure that this layer is not also targeted with "
            "`target_modules`: adapt the module there or its parameters here, not both."
        )


def own_parameter_names(module: nn.Module) -> list[str]:
    """The parameters a module holds itself, its parametrized ones included (those live in
    `module.parametrizations.<name>.original`; reading `module.<name>` runs the
    parametrization, and LoRA adds its update to that result, as PEFT does)."""
    names = [n for n, _ in module.named_parameters(recurse=False)]
    parametrized = getattr(module, "parametrizations", None)
    if isinstance(parametrized, nn.ModuleDict):
        names += [n for n in parametrized if n not in names]
    return names


def check_same_targets(model: nn.Module, owners: dict[str, list[str]]) -> None:
    """PEFT's rule: every adapter on a module's parameters adapts the same set of them (the
    file keys of each parameter's factors depend on the set), so a module whose layer holds
    other parameters' adapters refuses a new adapter on a different set."""
    for name, params in owners.items():
        layer = model.get_submodule(name)
        held = layer.targeted_parameters() if isinstance(layer, LoraParameters) else None
        if held is not None and layer.specs and sorted(held) != sorted(params):
            raise ValueError(
                "When using multiple adapters with `target_parameters`, all adapters must "
                f"target the same set of parameters, but got {[f'{name}.{p}' for p in params]} "
                f"for the new adapter and {[f'{name}.{p}' for p in held]} for adapter(s) "
                f"{', '.join(map(repr, layer.specs))}. Target the same parameters, or delete "
                "those adapters first"
            )


def parametrizations_of(module: nn.Module, path: str) -> parametrize.ParametrizationList | None:
    """The parametrization steps of the parameter at `path`, or None if it has none."""
    owner, _, leaf = path.rpartition(".")
    holder = module.get_submodule(owner) if owner else module
    if not parametrize.is_parametrized(holder, leaf):
        return None
    return holder.parametrizations[leaf]


class AddDelta(nn.Module):
    """A last parametrization step: LoRA's update added to the parametrized weight."""

    def __init__(self, delta: torch.Tensor) -> None:
        super().__init__()
        self.delta = delta

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta.to(weight.dtype)


@contextlib.contextmanager
def _added_step(steps: parametrize.ParametrizationList, step: nn.Module) -> Iterator[None]:
    """`step` appended to a parameter's parametrization steps while the block runs (replacing
    a parametrized weight through `functional_call` would write into its stored tensor)."""
    steps.append(step)
    try:
        yield
    finally:
        del steps[len(steps) - 1]


def stored_parameter(module: nn.Module, path: str) -> nn.Parameter:
    """The parameter at `path` that merging writes into; refused for a parametrized one,
    whose stored tensor is not the weight the module uses."""
    if parametrizations_of(module, path) is not None:
        raise NotImplementedError(
            f"merging LoRA into {path} of {type(module).__name__} is not supported: it is "
            "parametrized (torch.nn.utils.parametrize), so its stored tensor is not the weight "
            "the module uses. Keep the adapter unmerged, or unload it"
        )
    return module.get_parameter(path)


def tensor_at(module: nn.Module, path: str) -> torch.Tensor:
    """The tensor at a dotted attribute path: a parameter, or the plain tensor a wrapper
    such as FSDP (use_orig_params) puts in its place during a forward."""
    owner, _, leaf = path.rpartition(".")
    tensor = getattr(module.get_submodule(owner) if owner else module, leaf)
    if not isinstance(tensor, torch.Tensor):
        raise AttributeError(f"{path} of {type(module).__name__} is not a tensor")
    return tensor
