"""Bottleneck adapters (Houlsby et al., 2019; Pfeiffer et al., 2021; He et al., 2022).

A small two-layer network on a sub-block of each transformer layer. For the wrapped module's
input x and output h = f(x), with down projection D (b, in) + d, up projection U (out, b) + u,
non-linearity act and scale s:

    sequential (houlsby, pfeiffer):  y = h + s * U act(D h + d) + s u      (residual=True)
                                     y =     s * U act(D h + d) + s u      (residual=False)
    parallel:                        y = h + s * U act(D x + d) + s u

`houlsby` puts a sequential adapter after the attention output projection and after the MLP;
`pfeiffer` after the MLP only; `parallel` beside the MLP (it reads the MLP's input). U and u
start at zero, so a fresh adapter (with the residual) is an exact no-op. Adapters are not
mergeable (the non-linearity sits between the projections). Files: `peft_type:
"BOTTLENECK"`, per wrapped module `adapter_down.weight` (b, in), `adapter_down.bias` (b,),
`adapter_up.weight` (out, b), `adapter_up.bias` (out,), and `adapter_scale` (1,) when the
scale is learned; see docs/format.md.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from tilpass.config import AdapterConfig
from tilpass.config_fields import opt
from tilpass.errors import TargetModulesError
from tilpass.inject import base_modules, describe_modules
from tilpass.layers import AdapterLayer, is_linear_like, linear_features, tensor_version
from tilpass.methods.registry import Method
from tilpass.routing import Plan, scatter_add_rows

PLACEMENTS = ("houlsby", "pfeiffer", "parallel")
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}
LEARNED = "learned"

# Slot -> regex over full module names, per model family. "attention_output" is the module
# whose output is the attention block's (before the residual add); "mlp" the module whose
# input is the MLP's input and whose output is the MLP's output.
_DECODER = {"attention_output": r".*\.self_attn\.o_proj", "mlp": r".*\.mlp"}
SLOTS: dict[str, dict[str, str]] = {
    **{
        family: _DECODER
        for family in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")
    },
    "gpt2": {"attention_output": r".*\.attn\.c_proj", "mlp": r".*\.mlp"},
    # BERT-style encoders have no single MLP module: the sequential adapter sits on the MLP's
    # output projection, before the layer norm and residual (Houlsby's placement).
    **{
        family: {
            "attention_output": r".*\.attention\.output\.dense",
            "mlp_output": r".*\.layer\.\d+\.output\.dense",
        }
        for family in ("bert", "roberta", "xlm-roberta")
    },
}
SLOTS_OF_PLACEMENT = {
    "houlsby": (("attention_output",), ("mlp", "mlp_output")),
    "pfeiffer": (("mlp", "mlp_output"),),
    "parallel": (("mlp",),),
}


@dataclasses.dataclass
class BottleneckConfig(AdapterConfig):
    """Bottleneck adapter settings.

    Attributes:
        bottleneck_size: the adapter's hidden width b; unset, it is the wrapped module's
            output width divided by `reduction_factor`.
        reduction_factor: output width / b when `bottleneck_size` is unset.
        non_linearity: relu, gelu or silu.
        placement: houlsby, pfeiffer or parallel (see the module docstring).
        scaling: s, a number, or "learned" (a trained scalar per module, starting at 1).
        residual: sequential placements only; False = the adapter replaces the module's output.
        init_weights: True = up projection zero (a no-op at step 0); False = random (tests).
        attention_output_modules / mlp_modules: module names (exact or dotted suffix) or a
            regex over full names for each slot; unset = the table for the model family. A
            model outside the table, or a vision-language model's vision tower, names them.
    """

    PEFT_TYPE = "BOTTLENECK"

    bottleneck_size: int | None = opt(None, "Adapter width b; unset: width / reduction_factor.")
    reduction_factor: int = opt(16, "Module width / b when bottleneck_size is unset.")
    non_linearity: str = opt("relu", "relu, gelu or silu.")
    placement: str = opt("houlsby", "houlsby (attention + MLP), pfeiffer (MLP), parallel.")
    scaling: float | str = opt(1.0, "Scale s of the adapter's output, or 'learned'.")
    residual: bool = opt(True, "Add the module's output back (sequential placements).")
    init_weights: bool = opt(True, "True: up projection zero (a no-op at step 0).")
    attention_output_modules: list[str] | str | None = opt(
        None, "Attention output modules (names or regex); default per model family."
    )
    mlp_modules: list[str] | str | None = opt(
        None, "MLP modules (names or regex); default per model family."
    )

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement {self.placement!r}: choose one of {', '.join(PLACEMENTS)}")
        if self.non_linearity not in ACTIVATIONS:
            raise ValueError(
                f"non_linearity {self.non_linearity!r}: choose one of {', '.join(ACTIVATIONS)}"
            )
        if isinstance(self.scaling, str) and self.scaling != LEARNED:
            try:
                self.scaling = float(self.scaling)
            except ValueError:
                raise ValueError(
                    f"scaling {self.scaling!r}: give a number or {LEARNED!r}"
                ) from None
        if self.bottleneck_size is not None and self.bottleneck_size < 1:
            raise ValueError(f"bottleneck_size must be >= 1, got {self.bottleneck_size}")
        if self.reduction_factor < 1:
            raise ValueError(f"reduction_factor must be >= 1, got {self.reduction_factor}")
        if self.placement == "parallel" and not self.residual:
            raise ValueError("residual=False needs a sequential placement (houlsby or pfeiffer)")

    def layer_spec(self, module_name: str, initialize: bool) -> BottleneckSpec:
        learned = self.scaling == LEARNED
        return BottleneckSpec(
            size=self.bottleneck_size,
            reduction_factor=self.reduction_factor,
            activation=self.non_linearity,
            parallel=self.placement == "parallel",
            scale=1.0 if learned else float(self.scaling),
            learned_scale=learned,
            residual=self.residual,
            init=self.init_weights if initialize else None,
        )


@dataclasses.dataclass(frozen=True)
class BottleneckSpec:
    """One adapter's settings in one layer."""

    size: int | None
    reduction_factor: int
    activation: str
    parallel: bool  # read the module's input (beside it) instead of its output (after it)
    scale: float
    learned_scale: bool
    residual: bool
    init: bool | None = True  # None: allocate only (the tensors are loaded next)


class Bottleneck(nn.Module):
    """One adapter's down and up projections (and its learned scale, if any)."""

    def __init__(self, in_features: int, size: int, out_features: int, learned: bool) -> None:
        super().__init__()
        self.adapter_down = nn.Linear(in_features, size)
        self.adapter_up = nn.Linear(size, out_features)
        self.adapter_scale = nn.Parameter(torch.ones(1)) if learned else None


def module_features(module: nn.Module) -> tuple[int, int]:
    """(input width, output width) of a linear-like module, or of a block of them (its first
    linear's input and its last linear's output: an MLP's hidden size twice)."""
    if is_linear_like(module):
        return linear_features(module)
    linears = [m for m in module.modules() if is_linear_like(m)]
    if not linears:
        raise TypeError(
            f"a bottleneck adapter needs a linear layer or a block of them (an MLP), "
            f"not {type(module).__name__}"
        )
    return linear_features(linears[0])[0], linear_features(linears[-1])[1]


class BottleneckLayer(AdapterLayer):
    """Bottleneck adapters on a wrapped module's output; the formulas are in the module
    docstring."""

    STORES = ("bottleneck",)
    MERGEABLE = False
    HOLDS_TARGETS = True

    def __init__(self, base: nn.Module) -> None:
        super().__init__(base)
        self.in_features, self.out_features = module_features(base)
        self.bottleneck = nn.ModuleDict()
        self._stack_cache: tuple[Any, list[GroupStack]] | None = None

    def create(self, name: str, spec: BottleneckSpec) -> None:
        width = self.in_features if spec.parallel else self.out_features
        size = spec.size or max(1, self.out_features // spec.reduction_factor)
        if not spec.parallel and not spec.residual and width != self.out_features:
            raise NotImplementedError("residual=False needs equal input and output widths")
        ref = next(self.base_layer.parameters())
        dtype = ref.dtype if ref.is_floating_point() else torch.float32
        adapter = Bottleneck(width, size, self.out_features, spec.learned_scale)
        if spec.init is not False:
            nn.init.zeros_(adapter.adapter_up.weight)
            nn.init.zeros_(adapter.adapter_up.bias)
        self.bottleneck[name] = adapter.to(device=ref.device, dtype=dtype)

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self.specs:
            return {}
        return dict(self.bottleneck[name].named_parameters())

    def scale_of(self, name: str) -> torch.Tensor | float:
        adapter = self.bottleneck[name]
        return (
            adapter.adapter_scale if adapter.adapter_scale is not None else self.specs[name].scale
        )

    def apply_adapter(self, x: Any, result: Any, name: str) -> Any:
        """`result` with adapter `name` applied; a tuple output carries it on its first item."""
        if isinstance(result, tuple):
            return (self.apply_adapter(x, result[0], name), *result[1:])
        spec, adapter = self.specs[name], self.bottleneck[name]
        down, up = adapter.adapter_down, adapter.adapter_up
        source = x if spec.parallel else result
        if source.dtype != down.weight.dtype:
            source = source.to(down.weight.dtype)
        h = ACTIVATIONS[spec.activation](F.linear(source, down.weight, down.bias))  # (..., b)
        delta = F.linear(h, up.weight, up.bias)  # (..., out)
        if adapter.adapter_scale is not None or spec.scale != 1.0:
            delta = delta * self.scale_of(name)
        delta = delta.to(result.dtype)
        return result + delta if spec.parallel or spec.residual else delta

    # -- mixed batches ------------------------------------------------------------------------
    def mixed_forward(self, x: torch.Tensor, plan: Plan, *args: Any, **kw: Any) -> Any:
        """Each token through its own adapter: per group of adapters that read the same
        source (output, or input for parallel), one gather, two batched matmuls, one
        scatter-add; adapters of different widths are zero-padded to the widest, which is
        exact since act(0) = 0 for every supported non-linearity."""
        output = self.base_forward(x, *args, **kw)
        result = output[0] if isinstance(output, tuple) else output
        flat = result.reshape(-1, self.out_features).clone()  # (n, out)
        for stack in self.stacks(result.dtype):
            sub = plan.subset(stack.ids)
            if sub is None:
                continue
            assert sub.present is not None and sub.index is not None
            down_t, down_b, up_t, up_b, drop = stack.for_present(sub.present)
            source = x if stack.parallel else result
            src = source.reshape(-1, source.shape[-1]).to(flat.dtype)  # (n, in)
            h = src.index_select(0, sub.flat_index).view(*sub.index.shape, src.shape[-1])
            mid = stack.act(torch.baddbmm(down_b, h, down_t))  # (G, m, b)
            y = torch.baddbmm(up_b, mid, up_t)  # (G, m, out)
            if stack.replaces and not stack.parallel:
                y = y - h * drop  # residual=False rows: the adapter replaces the output
            mask = sub.mask_as(y.dtype)
            scatter_add_rows(y * mask if mask is not None else y, sub, flat)
        mixed = flat.view(result.shape)
        return (mixed, *output[1:]) if isinstance(output, tuple) else mixed

    def stacks(self, dtype: torch.dtype) -> list[GroupStack]:
        """Adapters stacked per (source, non-linearity), scale folded into the up projection.

        Derived state: cached under no-grad and rebuilt when adapters change (`invalidate`)
        or a tensor's version moves (an optimizer step); with gradients it is built fresh.
        """
        names = sorted(self.specs, key=self.ids.__getitem__)
        params = [p for n in names for p in self.bottleneck[n].parameters()]
        key = (dtype, tuple(id(p) for p in params), tuple(tensor_version(p) for p in params))
        if self._stack_cache is not None and self._stack_cache[0] == key:
            return self._stack_cache[1]
        groups: dict[tuple[bool, str], list[str]] = {}
        for name in names:
            spec = self.specs[name]
            groups.setdefault((spec.parallel, spec.activation), []).append(name)
        size = max(self.ids.values(), default=0) + 1
        stacks = [
            self.stack(group, parallel, act, size, dtype)
            for (parallel, act), group in groups.items()
        ]
        if not (torch.is_grad_enabled() and any(p.requires_grad for p in params)):
            self._stack_cache = (key, stacks)
        return stacks

    def stack(
        self, names: list[str], parallel: bool, act: str, size: int, dtype: torch.dtype
    ) -> GroupStack:
        """One group's tensors, zero-padded to its widest adapter."""
        width = max(self.bottleneck[n].adapter_down.out_features for n in names)
        down_t, down_b, up_t, up_b, drop = [], [], [], [], []
        for name in names:
            adapter, scale = self.bottleneck[name], self.scale_of(name)
            pad = width - adapter.adapter_down.out_features
            down_t.append(F.pad(adapter.adapter_down.weight.T, (0, pad)))  # (in, b)
            down_b.append(F.pad(adapter.adapter_down.bias, (0, pad)).unsqueeze(0))  # (1, b)
            up_t.append(F.pad((adapter.adapter_up.weight * scale).T, (0, 0, 0, pad)))  # (b, out)
            up_b.append((adapter.adapter_up.bias * scale).unsqueeze(0))  # (1, out)
            drop.append(0.0 if self.specs[name].residual else 1.0)
        row_of_id = torch.full((size,), -1, dtype=torch.long)
        row_of_id[[self.ids[n] for n in names]] = torch.arange(len(names))
        device = down_t[0].device
        return GroupStack(
            ids=tuple(self.ids[n] for n in names),
            row_of_id=row_of_id,
            parallel=parallel,
            act=ACTIVATIONS[act],
            down_t=torch.stack(down_t).to(dtype),
            down_b=torch.stack(down_b).to(dtype),
            up_t=torch.stack(up_t).to(dtype),
            up_b=torch.stack(up_b).to(dtype),
            drop=torch.tensor(drop, dtype=dtype, device=device).view(-1, 1, 1),
            replaces=any(drop),
        )

    def invalidate(self) -> None:
        self._stack_cache = None


@dataclasses.dataclass(frozen=True)
class GroupStack:
    """Stacked tensors of the adapters that share a source and a non-linearity."""

    ids: tuple[int, ...]
    row_of_id: torch.Tensor  # (max id + 1,) id -> row, -1 for adapters of other groups
    parallel: bool
    act: Any
    down_t: torch.Tensor  # (A, in, b)
    down_b: torch.Tensor  # (A, 1, b)
    up_t: torch.Tensor  # (A, b, out), scale folded in
    up_b: torch.Tensor  # (A, 1, out), scale folded in
    drop: torch.Tensor  # (A, 1, 1): 1 where residual=False (the source is subtracted)
    replaces: bool  # some adapter of the group has residual=False

    def for_present(self, present: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(down_t, down_b, up_t, up_b, drop) of the adapters `present` (ids in ascending
        order, as a routing plan lists them). When every adapter of the group occurs these
        are the stacked tensors themselves: indexing would copy each adapter's weights on
        every call."""
        tensors = (self.down_t, self.down_b, self.up_t, self.up_b, self.drop)
        if present.numel() == len(self.ids):
            return tensors
        rows = self.row_of_id.to(present.device)[present]  # (G,)
        return tuple(t[rows] for t in tensors)


def make_layer(module: nn.Module) -> BottleneckLayer:
    """Wrap a linear layer or a block of them (an MLP) in a bottleneck layer."""
    return BottleneckLayer(module)


def _matches(name: str, spec: list[str] | str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == entry or name.endswith("." + entry) for entry in spec)


def slot_patterns(model: nn.Module, config: BottleneckConfig) -> dict[str, list[str] | str]:
    """The module patterns of each slot the placement uses: the config's, else the table's."""
    model_type = str(getattr(getattr(model, "config", None), "model_type", None))
    table = SLOTS.get(model_type, {})
    explicit = {"attention_output": config.attention_output_modules, "mlp": config.mlp_modules}
    out: dict[str, list[str] | str] = {}
    for choices in SLOTS_OF_PLACEMENT[config.placement]:
        given = explicit.get(choices[0])
        if given is not None:
            out[choices[0]] = given
            continue
        found = next((c for c in choices if c in table), None)
        if found is None:
            raise TargetModulesError(
                f"bottleneck placement {config.placement!r} has no {choices[0]} modules for "
                f"model type {model_type!r} (known: {', '.join(sorted(SLOTS))}); set "
                f"{choices[0]}_modules to the module names or a regex. This model has: "
                f"{describe_modules(model)}"
            )
        out[found] = table[found]
    return out


def select_targets(model: nn.Module, config: BottleneckConfig) -> list[str]:
    """The modules the placement's slots name; every slot must match at least one."""
    names = [n for n, _ in base_modules(model) if n]
    found: list[str] = []
    for slot, pattern in slot_patterns(model, config).items():
        hits = [n for n in names if _matches(n, pattern)]
        if not hits:
            raise TargetModulesError(
                f"bottleneck slot {slot} ({pattern!r}) matches no module of "
                f"{type(model).__name__}. Modules by kind: {describe_modules(model)}"
            )
        found += [n for n in hits if n not in found]
    return found


METHOD = Method(
    name="bottleneck",
    config_class=BottleneckConfig,
    make_layer=make_layer,
    description="bottleneck adapter layers (Houlsby, Pfeiffer, parallel) on sub-block outputs",
    select_targets=select_targets,
)
