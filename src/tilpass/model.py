"""`AdaptedModel`: a base model plus named adapters, with PEFT's `PeftModel` method names.

This file holds the adapter management (add, activate, route, delete, disable); merging is in
`model_merge.py`, files in `model_files.py`, counting in `status.py` (mixins of one class).

The base model's modules are wrapped in place (base weights are never copied); each wrapper
holds every named adapter of that module. This class knows no method: it finds a config's
method in the registry and talks to layers only through the `AdapterLayer` protocol. It is the
API edge: adapter names (strings) become stable integer ids here before they reach a layer.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from tilpass import inputs, model_files, status, trained_biases
from tilpass.config import AdapterConfig
from tilpass.errors import AdapterNameError
from tilpass.inject import adapter_layers, inject, replace_module
from tilpass.layers import AdapterLayer
from tilpass.methods import UnknownMethodError, method_of
from tilpass.model_files import FilesMixin
from tilpass.model_merge import MergeMixin
from tilpass.routing import BASE, AdapterIds, Routing, batch_size, routed, routing_for
from tilpass.saved_modules import ModulesToSave
from tilpass.status import CountingMixin

PREFIX = model_files.PREFIX  # PEFT's key prefix for a model's adapter tensors
DEFAULT = model_files.DEFAULT


class AdaptedModel(MergeMixin, FilesMixin, CountingMixin, nn.Module):
    """A base model with named adapters; `forward` and `generate` pass through to the base.

    Args:
        model: any `torch.nn.Module`; a Hugging Face model is the main case.
        config: if given, an adapter is added under `adapter_name` and activated.
        adapter_name: the name of that first adapter.
        autocast_adapter_dtype: keep float16 / bfloat16 adapters in float32 (PEFT's default).
    """

    def __init__(
        self,
        model: nn.Module,
        config: AdapterConfig | None = None,
        adapter_name: str = DEFAULT,
        autocast_adapter_dtype: bool = True,
    ) -> None:
        super().__init__()
        self.base_model = model
        self.training = model.training  # a model in eval mode stays in eval mode
        self.adapter_ids = AdapterIds()
        self._layer_cache: list[AdapterLayer] | None = None
        self._param_cache: tuple[Any, dict[str, list[nn.Parameter]]] = (None, {})
        self._input_cache: tuple[list[AdapterLayer], list[AdapterLayer]] | None = None
        self.peft_config: dict[str, AdapterConfig] = {}
        self._active: list[str] = []
        self._disabled = 0  # depth of nested disable_adapter() blocks and disable_adapter_layers
        taken = [i for _, layer in adapter_layers(model) for i in layer.ids.values()]
        self.adapter_ids.skip_to(max(taken, default=-1) + 1)  # layers injected before
        for p in model.parameters():
            p.requires_grad_(False)
        if config is not None:
            self.add_adapter(adapter_name, config, autocast_adapter_dtype=autocast_adapter_dtype)
            self.set_adapter(adapter_name, inference_mode=config.inference_mode)

    # -- passing through ----------------------------------------------------------------------
    def forward(
        self,
        *args: Any,
        adapter_names: list[str] | None = None,
        adapter_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run the base model; `adapter_names` (one per row) or `adapter_ids` (one per row,
        or one per token for packed ragged batches; -1 = base) route tokens to adapters."""
        routing = self._routing(adapter_names, adapter_ids, batch_size(args, kwargs))
        args, kwargs = inputs.extend_inputs(self._input_layers(), args, kwargs, routing)
        if routing is None:
            return self.base_model(*args, **kwargs)
        with routed(routing):
            return self.base_model(*args, **kwargs)

    def _input_layers(self) -> list[AdapterLayer]:
        """The layers that extend the inputs (cached with the layer list)."""
        layers = self._layers()
        if self._input_cache is None or self._input_cache[0] is not layers:
            self._input_cache = (layers, [layer for layer in layers if layer.EXTENDS_INPUTS])
        return self._input_cache[1]

    def generate(
        self,
        *args: Any,
        adapter_names: list[str] | None = None,
        adapter_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """The base model's `generate`, with optional per-row adapters."""
        if adapter_ids is not None and adapter_ids.dim() != 1:
            raise ValueError("generate takes one adapter id per row (adapter_ids of shape (B,))")
        routing = self._routing(adapter_names, adapter_ids, batch_size(args, kwargs))
        context = contextlib.nullcontext() if routing is None else routed(routing)
        call_args, call_kwargs = inputs.extend_inputs(self._input_layers(), args, kwargs, routing)
        with context:
            return inputs.generate_extended(self.base_model, args, kwargs, call_args, call_kwargs)

    @property
    def extends_inputs(self) -> bool:
        """True when an active adapter changes the model's inputs (prompt tuning), so calling
        the base model's parts directly would leave it out."""
        return any(
            layer.EXTENDS_INPUTS
            and not layer.disabled
            and any(n in layer.specs for n in self._active)
            for layer in self._layers()
        )

    def get_base_model(self) -> nn.Module:
        """The wrapped model (with adapter layers in place; `unload` removes them)."""
        return self.base_model

    def adapter_id(self, adapter_name: str) -> int:
        """The stable integer id of an adapter (for `adapter_ids=`; -1 is the base model)."""
        self.check_adapter_name(adapter_name)
        return self.adapter_ids[adapter_name]

    def _layers(self) -> list[AdapterLayer]:
        """The adapter layers (cached: the hot paths must not walk the module tree each call)."""
        if self._layer_cache is None:
            self._layer_cache = [m for _, m in adapter_layers(self.base_model)]
        return self._layer_cache

    @property
    def config(self) -> Any:
        """The base model's config (for code that reads `model.config`); like PEFT's, missing
        (AttributeError) when the base model has none."""
        config = getattr(self.base_model, "config", None)
        if config is None:
            raise AttributeError(f"{type(self.base_model).__name__} has no config")
        return config

    def _routing(
        self, names: list[str] | None, ids: torch.Tensor | None, batch: int | None
    ) -> Routing | None:
        """The routing of one call, or None for a plain call (nothing is kept on the model)."""
        if names is None and ids is None:
            return None
        merged = sorted({n for layer in self._layers() for n in layer.merged})
        return routing_for(self.adapter_ids, names, ids, batch, self.training, merged)

    # -- adapters -----------------------------------------------------------------------------
    def add_adapter(
        self,
        adapter_name: str,
        peft_config: AdapterConfig,
        low_cpu_mem_usage: bool = False,
        autocast_adapter_dtype: bool = True,
    ) -> None:
        """Add a new adapter, inactive and frozen until `set_adapter` (PEFT trains only the
        active adapter).

        `low_cpu_mem_usage=True` (PEFT's name) skips initialising the new tensors, for callers
        that fill every one of them right after (as `load_adapter` does).
        `autocast_adapter_dtype=True` keeps float16 / bfloat16 adapter tensors in float32, as
        PEFT does, so training updates are not lost to rounding.
        """
        if adapter_name in self.peft_config:
            raise AdapterNameError(
                f"Adapter with name {adapter_name!r} already exists; pick another name or "
                "delete_adapter() it first"
            )
        if adapter_name == BASE or not adapter_name or "." in adapter_name:
            raise AdapterNameError(
                f"invalid adapter name {adapter_name!r}: use a non-empty name without dots, "
                f"other than {BASE!r}"
            )
        try:
            method = method_of(peft_config)
        except UnknownMethodError as exc:
            raise TypeError(
                f"unsupported config type {type(peft_config).__name__}: {exc}"
            ) from None
        trained_biases.check_one_bias_adapter(self.peft_config, adapter_name, peft_config)
        peft_config.check_new_adapter(self.peft_config)
        config = copy.deepcopy(peft_config)  # the caller's config stays as it was
        if config.base_model_name_or_path is None:
            base_config = getattr(self.base_model, "config", None)
            config.base_model_name_or_path = getattr(base_config, "name_or_path", None) or None
        adapter_id = self.adapter_ids.assign(adapter_name)
        try:
            inject(self.base_model, method, config, adapter_name, adapter_id, not low_cpu_mem_usage)
        except Exception:
            self._remove_traces(adapter_name)
            self.adapter_ids.release(adapter_name)
            raise
        self._layer_cache = None
        config.describe_layers([m for m in self._layers() if adapter_name in m.specs])
        self.peft_config[adapter_name] = config
        if autocast_adapter_dtype:
            self._upcast(adapter_name)
        for layer in self._layers():
            if adapter_name in layer.specs and self._disabled:
                layer.disabled = True
        self.set_requires_grad(adapter_name, adapter_name in self._active)

    def _upcast(self, adapter_name: str) -> None:
        """float16 / bfloat16 adapter tensors -> float32 (the same Parameter objects)."""
        # A whole `modules_to_save` copy computes in its input's dtype; it keeps the base's.
        layers = [m for m in self._layers() if not isinstance(m, ModulesToSave)]
        if upcast_to_float32([p for m in layers for p in m.adapter_parameters(adapter_name)]):
            for layer in layers:
                layer.invalidate()

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """Turn gradients on or off for the given adapters' parameters (PEFT's method)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in names:
            self.check_adapter_name(name)
            for p in self.adapter_parameters(name):
                p.requires_grad_(requires_grad)

    def adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        """The parameters of one adapter, in every layer (saved-module copies included), and
        the base biases it trains (`bias="all"` / `"lora_only"`)."""
        params = [p for layer in self._layers() for p in layer.adapter_parameters(adapter_name)]
        return params + list(self.trained_biases(adapter_name).values())

    def trained_biases(self, adapter_name: str) -> dict[str, nn.Parameter]:
        """The base biases adapter `adapter_name` trains, by PEFT's key (`trained_biases.py`)."""
        bias = trained_biases.bias_mode(self.peft_config.get(adapter_name))
        return trained_biases.trained_biases(self.base_model, adapter_name, bias)

    def training_hooks(self) -> list[Any]:
        """Hooks the trainer calls for the active adapters' methods (loss terms and
        after-backward steps, e.g. AdaLoRA's); most methods have none."""
        hooks: list[Any] = []
        for name in self._active:
            method = method_of(self.peft_config[name])
            if method.training_hooks is not None:
                hooks += method.training_hooks(self, name)
        return hooks

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Activate one adapter, or several whose updates then add up.

        As in PEFT, only active adapters train: theirs get `requires_grad=True` (unless
        `inference_mode`), every other adapter's `requires_grad=False`. An adapter made under
        `torch.inference_mode` has inference tensors, which can never train; they are left as
        they are.
        """
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for name in names:
            self.check_adapter_name(name)
        self._active = names
        for layer in self._layers():
            layer.active = list(names)
        for name in self.peft_config:
            wanted = name in names and not inference_mode
            for p in self._params_of(name):
                if p.requires_grad != wanted and not p.is_inference():
                    p.requires_grad_(wanted)

    def _params_of(self, name: str) -> list[nn.Parameter]:
        """`adapter_parameters(name)`, cached with the layer list (adding or deleting an
        adapter starts a new one), so switching adapters does not walk every layer."""
        layers = self._layers()
        if self._param_cache[0] is not layers:
            self._param_cache = (layers, {})
        params = self._param_cache[1].get(name)
        if params is None:
            params = self._param_cache[1][name] = self.adapter_parameters(name)
        return params

    @property
    def active_adapters(self) -> list[str]:
        """The names of the active adapters."""
        return list(self._active)

    @property
    def active_adapter(self) -> str | list[str]:
        """The active adapter's name (a list when several are active, as in PEFT)."""
        return self._active[0] if len(self._active) == 1 else list(self._active)

    @property
    def active_peft_config(self) -> AdapterConfig:
        """The config of the active adapter (the first, when several are active)."""
        if not self._active:
            raise ValueError("no adapter is active; call set_adapter(name) first")
        return self.peft_config[self._active[0]]

    @property
    def has_active_enabled_adapter(self) -> bool:
        """Whether a plain forward applies an adapter: one is active and none is disabled."""
        return bool(self._active) and not self._disabled

    @property
    def prefix(self) -> str:
        """The start of the active method's adapter parameter names ("lora_"), as PEFT's."""
        configs = [self.peft_config[n] for n in self._active] or list(self.peft_config.values())
        return method_of(configs[0]).prefix if configs else ""

    @property
    def targeted_module_names(self) -> list[str]:
        """Paths of the modules `target_modules` adapted (PEFT's list: not `modules_to_save`
        copies, trained token rows or `target_parameters` owners)."""
        return [
            name
            for name, layer in adapter_layers(self.base_model)
            if not layer.AUXILIARY and not layer.targeted_parameters()
        ]

    @property
    def targeted_parameter_names(self) -> list[str]:
        """Paths of the parameters adapted directly (LoRA's `target_parameters`), PEFT's."""
        return [
            f"{name}.{param}"
            for name, layer in adapter_layers(self.base_model)
            for param in layer.targeted_parameters()
        ]

    def adapter_layer_list(self) -> list[AdapterLayer]:
        """Every adapter layer of the model (for the modules that save, load and combine)."""
        return list(self._layers())

    def refresh_layers(self) -> None:
        """Forget the cached layer list, after layers were added, removed or unwrapped."""
        self._layer_cache = None

    def get_layer_status(self) -> list[status.TunerLayerStatus]:
        """PEFT's per-layer status: enabled, active, merged, requires_grad, devices."""
        return status.get_layer_status(self)

    def get_model_status(self) -> status.TunerModelStatus:
        """PEFT's model status: the layers' status summed up ("irregular" where they differ)."""
        return status.get_model_status(self)

    def check_adapter_name(self, name: str) -> None:
        """Raise `AdapterNameError` naming the loaded adapters unless `name` is one of them."""
        if name not in self.peft_config:
            known = ", ".join(self.peft_config) or "(none)"
            raise AdapterNameError(f"no adapter named {name!r}; loaded adapters: {known}")

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter everywhere; layers left without adapters become base modules."""
        if adapter_name not in self.peft_config:  # PEFT's message, and the names there are
            known = ", ".join(self.peft_config) or "(none)"
            raise AdapterNameError(
                f"Adapter {adapter_name} does not exist; loaded adapters: {known}"
            )
        if any(adapter_name in layer.merged for layer in self._layers()):
            raise ValueError(
                f"Cannot delete adapter(s) {[adapter_name]} while they are merged. Please unmerge "
                "them first."
            )
        self._remove_traces(adapter_name)
        del self.peft_config[adapter_name]
        self.adapter_ids.release(adapter_name)
        remaining = [a for a in self._active if a != adapter_name]
        if not remaining and self.peft_config:
            remaining = [next(iter(self.peft_config))]
        self.set_adapter(remaining) if remaining else setattr(self, "_active", [])

    def _remove_traces(self, adapter_name: str) -> None:
        self._layer_cache = None
        for name, layer in list(adapter_layers(self.base_model)):
            layer.delete(adapter_name)
            if not layer.specs:
                replace_module(self.base_model, name, layer.unwrap(merge=False))

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the block the model is the base model; merged adapters are unmerged first
        and merged again after. Blocks nest: only the outermost one re-enables."""
        layers = self._layers()
        merged = [list(layer.merged) for layer in layers]
        self.disable_adapter_layers()
        try:
            yield
        finally:
            self._disabled = max(self._disabled - 1, 0)
            if not self._disabled:
                for layer, names in zip(layers, merged, strict=True):
                    layer.disabled = False
                    if names:
                        layer.merge(names)

    def disable_adapter_layers(self) -> None:
        """Turn every adapter layer off (merged adapters are unmerged) until
        `enable_adapter_layers`; the model then computes as the base model."""
        for name in self._active:
            bias = trained_biases.bias_mode(self.peft_config.get(name))
            if bias != trained_biases.NONE:
                warnings.warn(trained_biases.DISABLE_WARNING.format(bias=bias), stacklevel=2)
        self._disabled += 1
        for layer in self._layers():
            layer.unmerge()
            layer.disabled = True

    def enable_adapter_layers(self) -> None:
        """Turn the adapter layers on again (after `disable_adapter_layers`)."""
        self._disabled = 0
        for layer in self._layers():
            layer.disabled = False


def get_peft_model(
    model: nn.Module,
    peft_config: AdapterConfig,
    adapter_name: str = DEFAULT,
    mixed: bool = False,
    autocast_adapter_dtype: bool = True,
    revision: str | None = None,
    low_cpu_mem_usage: bool = False,
) -> AdaptedModel:
    """Wrap `model` with a new adapter: the base is frozen, the adapter trains.

    PEFT's signature. Adapters of different methods mix in one model anyway (`mixed` changes
    nothing); `autocast_adapter_dtype` keeps float16 / bfloat16 adapters in float32. As in
    PEFT, the config's `base_model_name_or_path` becomes the model's own `name_or_path`, with
    a warning when that replaces a different name.
    """
    peft_config = copy.copy(peft_config)  # the caller's config stays as it was
    new_name = model_name_or_path(model)
    old_name = peft_config.base_model_name_or_path
    if old_name is not None and old_name != new_name:
        warnings.warn(
            f"The PEFT config's `base_model_name_or_path` was renamed from '{old_name}' to "
            f"'{new_name}'. Please ensure that the correct base model is loaded when loading "
            "this checkpoint (the name recorded is the model's own `name_or_path`).",
            stacklevel=2,
        )
    peft_config.base_model_name_or_path = new_name
    if revision is not None:
        peft_config.revision = revision
    if any(isinstance(m, AdapterLayer) for m in model.modules()):
        warnings.warn(
            "You are trying to modify a model with PEFT for a second time. If you want to reload "
            "the model with a different config, make sure to call `.unload()` before.",
            stacklevel=2,
        )
    from tilpass.task_models import TASK_MODELS  # they build on this module

    cls = TASK_MODELS.get(peft_config.task_type or "", AdaptedModel)  # PEFT's class per task
    return cls(model, peft_config, adapter_name, autocast_adapter_dtype)


def upcast_to_float32(params: list[nn.Parameter]) -> bool:
    """float16 / bfloat16 parameters -> float32, in place of their data. Parameters that share
    storage (a tied layer's views of the embedding's factors) keep sharing it: each storage
    is converted once and every parameter on it becomes the same view of the new one.
    Returns whether anything changed."""
    converted: dict[tuple[torch.device, int], torch.Tensor] = {}
    changed = False
    for p in params:
        if p.dtype not in (torch.float16, torch.bfloat16):
            continue
        changed = True
        storage = p.untyped_storage()
        if p.is_meta or storage.data_ptr() == 0:  # no data to share (meta, empty)
            p.data = p.data.float()
            continue
        key = (p.device, storage.data_ptr())
        if key not in converted:
            whole = torch.empty(0, dtype=p.dtype, device=p.device).set_(storage)
            converted[key] = whole.float()
        p.data = converted[key].as_strided(p.shape, p.stride(), p.storage_offset())
    return changed


def model_name_or_path(model: nn.Module) -> str | None:
    """The name a model was loaded under (a Hugging Face model's `name_or_path`, else its
    config's), or None for a model built in code."""
    name = model.__dict__.get("name_or_path") or None
    if name is None:
        name = getattr(getattr(model, "config", None), "name_or_path", None) or None
    return None if name is None else str(name)


PeftModel = AdaptedModel
