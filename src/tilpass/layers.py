"""The adapter-layer protocol: what every method's layer does, whatever its method.

An adapter layer wraps one module of the base model and holds any number of named adapters.
It *calls* the wrapped module for the base result and never re-implements its forward, so a
quantized or otherwise special base works unchanged. The wrapped module's own parameters,
buffers and children are registered on the layer under their own names (the same tensor
objects), so the model's state-dict keys do not change (`q_proj.weight`, not
`q_proj.base_layer.weight`) and moving the model moves the base with it.

Three shapes of method fit this one protocol:

- a weight delta on a linear-like module (LoRA, DoRA, (IA)^3): `apply_adapter` adds or
  scales, `merge` folds the change into the wrapped weight;
- a small module on a sub-block's output (bottleneck adapters): the layer wraps the sub-block
  (an MLP, an attention block) and `apply_adapter` transforms its output;
- inputs prepended to the sequence (prompt tuning): the layer wraps the input embedding and
  sets `EXTENDS_INPUTS`; the model hands it the call's keyword inputs before the base forward
  (`extend_inputs`), and it returns them with virtual-token embeddings prepended and the
  attention mask, position ids and labels extended to match.

The model (`tilpass.model`) talks to layers only through the methods declared here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from tilpass.routing import Plan, current_routing

try:  # GPT-2's transposed linear layer; optional so non-transformers models need nothing.
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = None  # type: ignore[assignment,misc]


def is_transposed(module: nn.Module) -> bool:
    """GPT-2's Conv1D: a linear layer whose weight is stored (in, out)."""
    return Conv1D is not None and isinstance(module, Conv1D)


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear (and its subclasses, such as quantized linears) or GPT-2's Conv1D."""
    return isinstance(module, nn.Linear) or is_transposed(module)


def has_plain_linear_forward(module: nn.Module) -> bool:
    """Exactly nn.Linear or Conv1D (not a subclass): its forward is known to be x W^T + b."""
    return type(module) is nn.Linear or (Conv1D is not None and type(module) is Conv1D)


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear-like module (from its attributes, since a
    quantized weight's shape is not its logical shape)."""
    if is_transposed(module):
        rows, cols = module.weight.shape
        return int(rows), int(cols)
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features), int(module.out_features)
    out_features, in_features = module.weight.shape
    return int(in_features), int(out_features)


def tensor_version(tensor: torch.Tensor) -> object:
    """The tensor's in-place version counter, which derived no-grad caches are checked against.

    An inference tensor (made under `torch.inference_mode`, e.g. an adapter built there) has
    no counter and may change in place unseen, so it gets a fresh token that equals nothing:
    a cache keyed on it never hits and is rebuilt each time, which is always correct.
    """
    return object() if tensor.is_inference() else tensor._version


def is_quantized(module: nn.Module) -> bool:
    """A module whose weight is stored in an integer format (a 4- or 8-bit quantized base)."""
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and not weight.is_floating_point()


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The module's weight as a dense float tensor in its stored layout.

    A plain weight is returned as it is (the same tensor); a quantized one is dequantized into
    a new tensor (`tilpass.quantize`), which is what merging and DoRA's row norms need.
    """
    if not is_quantized(module):
        return module.weight
    from tilpass.quantize import dequantize_weight

    return dequantize_weight(module)


def requantized(module: nn.Module, dense: torch.Tensor) -> nn.Parameter:
    """A new quantized weight for a quantized `module` from a dense (out, in) tensor; raises
    unless re-quantizing was asked for (`tilpass.quantize.allow_requantize`)."""
    from tilpass.quantize import requantized_weight

    return requantized_weight(module, dense)


class AdapterLayer(nn.Module):
    """Base of every method's layer: a wrapped module plus named adapters.

    Subclasses set `STORES` (the names of their `ParameterDict` / `ModuleDict` attributes keyed
    by adapter name) and implement `create`, `adapter_tensors` and `apply_adapter`; mergeable
    methods also implement `merge` / `unmerge`, and methods with a batched mixed path implement
    `mixed_forward`.

    Attributes:
        specs: adapter name -> the method's per-layer settings for it.
        ids: adapter name -> the model's stable integer id for it (routing uses ids).
        active: the adapters a plain (unrouted) forward applies, in order.
        merged: the adapters currently folded into the wrapped module's weights.
        disabled: while True the layer is exactly its wrapped module.
    """

    STORES: ClassVar[tuple[str, ...]] = ()
    MERGEABLE: ClassVar[bool] = False
    # True: merging folds nothing, the layer must stay in place (prompt tuning's virtual
    # tokens), so `merge_and_unload` refuses while such an adapter is active.
    STAYS_WHEN_MERGED: ClassVar[bool] = False
    # True: the model calls `extend_inputs` before every forward and `generate`.
    EXTENDS_INPUTS: ClassVar[bool] = False
    # True: `adapter_tensors` keys are whole file keys (PEFT's `prompt_embeddings`), not
    # suffixes of this layer's module path.
    ROOT_KEYS: ClassVar[bool] = False
    # True: the wrapped module is a block (an MLP) whose own modules other adapters may still
    # target; target search descends into it and `replace_child` swaps them in both places.
    HOLDS_TARGETS: ClassVar[bool] = False
    # True: a layer beside the method's targets (a modules_to_save copy, trained token rows),
    # which PEFT does not count among `targeted_module_names`.
    AUXILIARY: ClassVar[bool] = False
    STATUS_TYPE: ClassVar[str] = ""
    """The layer's kind as PEFT's status reports name it ("lora.Linear"); see `status_type`."""
    STATUS_SUFFIX: ClassVar[str] = ""
    """Appended to the layer's path in status reports where PEFT reports a layer nested below
    the module (its trainable tokens sit in `<embedding>.token_adapter`)."""

    def __init__(self, base: nn.Module, adopt: bool = True) -> None:
        super().__init__()
        # Held in a tuple, not registered as a child: its tensors are registered on this layer
        # under their own names instead (same objects), so keys stay the base model's.
        self._held: tuple[nn.Module] = (base,)
        if adopt:
            persistent = set(base.state_dict(keep_vars=True))
            # Every parameter slot, the empty ones too (Linear(bias=False) has bias = None).
            for name, param in vars(base)["_parameters"].items():
                self.register_parameter(name, param)
            for name, buf in base.named_buffers(recurse=False):
                self.register_buffer(name, buf, persistent=name in persistent)
            for name, child in base.named_children():
                self.add_module(name, child)
        self.adopted = adopt
        self.specs: dict[str, Any] = {}
        self.ids: dict[str, int] = {}
        self.name_of: dict[int, str] = {}  # the reverse of `ids`, for routed calls
        self.active: list[str] = []
        self.merged: list[str] = []
        self.disabled = False
        self.training = base.training

    # -- status -----------------------------------------------------------------------------
    @property
    def status_type(self) -> str:
        """This layer's kind as PEFT's `get_layer_status` names it ("lora.Linear"), so status
        reports read the same in both libraries; the class name unless a layer says otherwise."""
        return self.STATUS_TYPE or type(self).__name__

    def targeted_parameters(self) -> list[str]:
        """Names (in the wrapped module) of the parameters this layer adapts directly, as
        PEFT's `target_parameters` name them; empty for a layer that adapts its module."""
        return []

    # -- the wrapped module -----------------------------------------------------------------
    @property
    def base_layer(self) -> nn.Module:
        """The wrapped module (called for the base result)."""
        return self._held[0]

    def replace_child(self, name: str, module: nn.Module) -> None:
        """Put `module` in place of child `name` on this layer and on the wrapped module, which
        is the one that runs (an (IA)^3 layer on the up_proj of a bottleneck-wrapped MLP)."""
        setattr(self, name, module)
        if self.adopted:
            setattr(self._held[0], name, module)

    def base_forward(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped module's own forward."""
        return self._held[0](*args, **kwargs)

    def set_base_parameter(self, name: str, value: nn.Parameter) -> None:
        """Replace one of the wrapped module's parameters (here and in the module itself)."""
        setattr(self._held[0], name, value)
        setattr(self, name, value)

    def unwrap(self, merge: bool = False) -> nn.Module:
        """The module to put back into the model: merged first if `merge`, else unmerged."""
        if self.MERGEABLE:
            if merge:
                self.merge(list(self.active))
            else:
                self.unmerge()
        elif merge and any(n in self.specs for n in self.active):
            raise NotImplementedError(
                f"{type(self).__name__} cannot be merged into the base weights; keep the adapter "
                "loaded (or unload it)"
            )
        return self._held[0]

    def train(self, mode: bool = True) -> AdapterLayer:
        super().train(mode)
        self._held[0].training = mode
        return self

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> AdapterLayer:
        # A device or dtype move may give this layer new tensor objects; the wrapped module
        # must see the same ones, since it is the module that runs.
        super()._apply(fn, recurse)
        if self.adopted:
            base = self._held[0]
            for name, param in self.named_parameters(recurse=False):
                if name in dict(base.named_parameters(recurse=False)):
                    setattr(base, name, param)
            for name, buf in self.named_buffers(recurse=False):
                setattr(base, name, buf)
        return self

    # -- adapters ---------------------------------------------------------------------------
    def add_adapter(self, name: str, adapter_id: int, spec: Any) -> None:
        """Create adapter `name` with the model's id for it and this layer's settings."""
        self.create(name, spec)
        self.specs[name] = spec
        self.ids[name] = adapter_id
        self.name_of[adapter_id] = name
        self.invalidate()

    def create(self, name: str, spec: Any) -> None:  # pragma: no cover - abstract
        """Allocate (and, unless `spec` says the tensors are about to be loaded, initialise)."""
        raise NotImplementedError

    def delete(self, name: str) -> None:
        """Remove every trace of adapter `name` from this layer."""
        if name in self.merged:
            raise RuntimeError(f"adapter {name!r} is merged into the weights; unmerge it first")
        for store in self.STORES:
            holder = getattr(self, store)
            if name in holder:
                del holder[name]
        self.specs.pop(name, None)
        self.name_of.pop(self.ids.pop(name, -1), None)
        self.active = [a for a in self.active if a != name]
        self.invalidate()

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """The trainable tensors of adapter `name` in this layer."""
        params: list[nn.Parameter] = []
        for store in self.STORES:
            holder = getattr(self, store)
            if name in holder:
                item = holder[name]
                params += [item] if isinstance(item, nn.Parameter) else list(item.parameters())
        return params

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:  # pragma: no cover
        """This layer's tensors of adapter `name`, keyed by the suffix its files use."""
        raise NotImplementedError

    def invalidate(self) -> None:
        """Drop derived state (stacked or transposed copies) after adapters changed."""

    def merge_targets(self) -> list[str]:
        """Names of the wrapped module's parameters that merging changes."""
        return []

    def original_tensor(self, target: str) -> torch.Tensor:
        """The tensor `target` as the rest of the model knows it (not a merge's copy)."""
        return getattr(self, target)

    def mark_shared(self, users: dict[str, list[str]]) -> None:
        """Told before merging which other modules use each of `merge_targets()`' tensors."""

    def shared_with(self) -> list[str]:
        """The other modules that share a tensor merging changes (after `mark_shared`)."""
        return []

    @torch.no_grad()
    def merge(self, names: list[str] | None = None) -> None:  # pragma: no cover - abstract
        """Fold adapters (default: the active ones) into the wrapped weights; idempotent."""
        raise NotImplementedError(f"{type(self).__name__} cannot merge")

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take every merged adapter back out of the wrapped weights."""
        if self.merged:  # pragma: no cover - only mergeable layers merge
            raise NotImplementedError

    # -- inputs -----------------------------------------------------------------------------
    def extend_inputs(self, inputs: dict[str, Any], row_ids: torch.Tensor | None) -> dict[str, Any]:
        """The model's keyword inputs for this call, changed as the active adapters need.

        Called only on layers with `EXTENDS_INPUTS`; `row_ids` are the call's per-row adapter
        ids (None for an unrouted call). Returns `inputs` itself when nothing changes.
        """
        return inputs

    # -- forward ----------------------------------------------------------------------------
    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        if self.disabled or not self.specs:
            return self.base_forward(x, *args, **kwargs)
        routing = current_routing()
        if routing is None:
            names = self.active
        else:
            plan = routing.plan(self.rows(x), self.device_of(x))
            if plan.single is None:
                return self.mixed_forward(x, plan, *args, **kwargs)
            names = [self.name_of[plan.single]] if plan.single in self.name_of else []
        names = [n for n in names if n in self.specs and n not in self.merged]
        if not names:
            return self.base_forward(x, *args, **kwargs)
        return self.adapted_forward(x, names, *args, **kwargs)

    def adapted_forward(self, x: Any, names: list[str], *args: Any, **kwargs: Any) -> Any:
        """The base result with adapters `names` applied in turn (a method may fuse this)."""
        result = self.base_forward(x, *args, **kwargs)
        for name in names:
            result = self.apply_adapter(x, result, name)
        return result

    def apply_adapter(self, x: Any, result: Any, name: str) -> Any:  # pragma: no cover
        """Adapter `name`'s change to the base result `result` for input `x`."""
        raise NotImplementedError

    def mixed_forward(self, x: Any, plan: Plan, *args: Any, **kwargs: Any) -> Any:
        """The wrapped module's result with each token's own adapter, in one batched pass
        (tensor ops over groups of tokens, never a loop over rows or adapters)."""
        raise NotImplementedError(
            f"{type(self).__name__} does not support mixed-adapter batches; run each adapter's "
            "rows in a batch of their own"
        )

    def rows(self, x: torch.Tensor) -> int:
        """How many tokens the input `x` holds (the routing plan is per token)."""
        return x.numel() // x.shape[-1]

    @staticmethod
    def device_of(x: Any) -> torch.device:
        return x.device if isinstance(x, torch.Tensor) else torch.device("cpu")
