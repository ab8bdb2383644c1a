"""PEFT's status report of a model's adapter layers: `get_layer_status` / `get_model_status`.

Each layer reports whether it is enabled, which adapters it holds, which are active and
merged, whether their parameters train, and where they are; the model's status sums the
layers up and says "irregular" where they disagree (a model in an inconsistent state). The
parameter counts behind `print_trainable_parameters` are here too, with `CountingMixin`, the
`AdaptedModel` methods that report them.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from torch import nn

from tilpass.inject import adapter_layers
from tilpass.layers import AdapterLayer
from tilpass.quantize import BaseStorage, backend_name, measure_storage

if TYPE_CHECKING:
    from tilpass.config import AdapterConfig
    from tilpass.model import AdaptedModel

Irregular = Literal["irregular"]


@dataclass
class TunerLayerStatus:
    """One adapter layer's status (PEFT's fields)."""

    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None = None


@dataclass
class TunerModelStatus:
    """The whole model's adapter status (PEFT's fields)."""

    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: bool | Irregular
    active_adapters: list[str] | Irregular
    merged_adapters: list[str] | Irregular
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | Irregular | None = None


def _agree(values: list[bool | Irregular]) -> bool | Irregular:
    if all(v is True for v in values):
        return True
    if all(v is False for v in values):
        return False
    return "irregular"


PEFT_TUNER_PREFIX = "model."
"""Where PEFT's status puts the base model's modules of a `PeftModel` (its tuner object holds
the base as `.model`), so layer names read as in PEFT: "model.lin0"."""


def _root(model: nn.Module) -> tuple[nn.Module, str]:
    """The model whose modules carry the layers, and the prefix status names get."""
    from tilpass.model import AdaptedModel

    if isinstance(model, AdaptedModel):
        return model.base_model, PEFT_TUNER_PREFIX
    return model, ""


def adapter_model_type(configs: dict[str, AdapterConfig]) -> str:
    """PEFT's `adapter_model_type` for a model with these adapters: its tuner class for their
    method, named after the config class ("LoraModel" for `LoraConfig`), or "MixedModel" for
    adapters of several methods."""
    kinds = {type(config).__name__.removesuffix("Config") for config in configs.values()}
    return f"{kinds.pop()}Model" if len(kinds) == 1 else "MixedModel"


def _layer_status(name: str, layer: AdapterLayer) -> TunerLayerStatus:
    grads: dict[str, bool | Irregular] = {}
    devices: dict[str, list[str]] = {}
    for adapter in layer.specs:
        params = layer.adapter_parameters(adapter)
        grads[adapter] = _agree([p.requires_grad for p in params])
        devices[adapter] = sorted({p.device.type for p in params})
    return TunerLayerStatus(
        name=name + layer.STATUS_SUFFIX,
        module_type=layer.status_type,
        enabled=not layer.disabled,
        active_adapters=[a for a in layer.active if a in layer.specs],
        merged_adapters=list(layer.merged),
        requires_grad=grads,
        available_adapters=sorted(layer.specs),
        devices=devices,
        quantization_backend=backend_name(layer.base_layer),
    )


def get_layer_status(model: nn.Module) -> list[TunerLayerStatus]:
    """The status of every adapter layer of `model` (an `AdaptedModel` or a plain model with
    injected layers); raises if it has none."""
    root, prefix = _root(model)
    found = [_layer_status(prefix + name, layer) for name, layer in adapter_layers(root)]
    if not found:
        raise ValueError(
            "No adapter layers found in the model, please ensure that it's a PEFT model or that "
            "you have PEFT adapters injected in the model."
        )
    return found


def _merged(layers: list[TunerLayerStatus]) -> list[str] | Irregular:
    """Adapters merged in every layer that holds them; "irregular" if merged in only some."""
    merged_all = {a for s in layers for a in s.merged_adapters}
    for status in layers:
        unmerged = set(status.available_adapters) - set(status.merged_adapters)
        if unmerged & merged_all:
            return "irregular"
    return sorted(merged_all)


def get_model_status(model: nn.Module) -> TunerModelStatus:
    """The model's adapter status, summed over its layers."""
    from tilpass.model import AdaptedModel

    layers = get_layer_status(model)
    root, _ = _root(model)
    enabled = {s.enabled for s in layers}
    active = {tuple(s.active_adapters) for s in layers}
    backends = {s.quantization_backend for s in layers}
    grads: dict[str, list[bool | Irregular]] = collections.defaultdict(list)
    devices: dict[str, set[str]] = collections.defaultdict(set)
    for status in layers:
        for key, value in status.requires_grad.items():
            grads[key].append(value)
        for key, where in status.devices.items():
            devices[key].update(where)
    if isinstance(model, AdaptedModel):
        peft_types = {n: str(c.PEFT_TYPE) for n, c in model.peft_config.items()}
        adapters = adapter_model_type(model.peft_config)
        trainable, total = model.get_nb_trainable_parameters()
    else:  # a plain model with injected layers: PEFT reports no adapter model
        peft_types, adapters = {}, "None"
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return TunerModelStatus(
        base_model_type=type(root).__name__,
        adapter_model_type=adapters,
        peft_types=peft_types,
        trainable_params=trainable,
        total_params=total,
        num_adapter_layers=len(layers),
        enabled=enabled.pop() if len(enabled) == 1 else "irregular",
        active_adapters=list(active.pop()) if len(active) == 1 else "irregular",
        merged_adapters=_merged(layers),
        requires_grad={k: _agree(v) for k, v in grads.items()},
        available_adapters=sorted({a for s in layers for a in s.available_adapters}),
        devices={k: sorted(v) for k, v in devices.items()},
        quantization_backend=backends.pop() if len(backends) == 1 else "irregular",
    )


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts of a model; a packed 4-bit weight counts the weights
    it holds (two per byte), as PEFT counts them."""
    from tilpass.quantize import logical_numel

    trainable = total = 0
    for p in model.parameters():
        count = logical_numel(p)
        total += count
        trainable += count if p.requires_grad else 0
    return trainable, total


def trainable_line(trainable: int, total: int) -> str:
    """PEFT's line: trainable params: N || all params: M || trainable%: P."""
    return (
        f"trainable params: {trainable:,d} || all params: {total:,d} || "
        f"trainable%: {100 * trainable / max(total, 1):.4f}"
    )


class CountingMixin:
    """`AdaptedModel`'s counting API: trainable parameters (PEFT's names) and base storage."""

    def get_nb_trainable_parameters(self: AdaptedModel) -> tuple[int, int]:
        """(trainable, all) parameter counts; shared (tied) tensors count once, and a packed
        4-bit weight counts the weights it holds (two per byte), as in PEFT."""
        return parameter_counts(self)

    def print_trainable_parameters(self: AdaptedModel) -> None:
        """Print PEFT's line: trainable params: N || all params: M || trainable%: P."""
        print(trainable_line(*self.get_nb_trainable_parameters()))

    def base_storage(self: AdaptedModel) -> BaseStorage:
        """The base weights' resident bytes and, for a quantized base, bits per weight,
        measured from the tensors (the adapters' own tensors left out)."""
        adapters = {id(p) for name in self.peft_config for p in self.adapter_parameters(name)}
        return measure_storage(self.base_model, exclude=adapters)

    def print_base_storage(self: AdaptedModel) -> None:
        """Print the sibling line of `print_trainable_parameters` (e.g. 4.127 bits per weight
        for NF4 with double quantization)."""
        print(self.base_storage().describe())
