"""PEFT's low-level functions on adapter tensors: read and write an adapter's state dict, and
inject adapter layers into a plain model without the `AdaptedModel` wrapper.

Keys are PEFT's: `base_model.model.<module>.lora_A.weight` for an `AdaptedModel`, and
`<module>.lora_A.weight` for a plain model with injected layers (as PEFT's
`inject_adapter_in_model` gives), so state dicts move between the two libraries unchanged.
"""

from __future__ import annotations

import re
import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from tilpass.config import AdapterConfig
from tilpass.errors import AdapterNameError
from tilpass.inject import adapter_layers
from tilpass.layers import AdapterLayer
from tilpass.meta_adapters import materialize, to_meta
from tilpass.trained_biases import all_biases

if TYPE_CHECKING:
    from tilpass.model import AdaptedModel

PREFIX = "base_model.model."
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")
"""PEFT's names for the layers whose base weights `save_embedding_layers="auto"` saves."""


WRAPPERS = ("FullyShardedDataParallel", "DistributedDataParallel")
"""torch's data-parallel wrappers: they hold the model as `.module` (names stay the model's
with use_orig_params), so PEFT's functions look through them."""


def _adapted(model: nn.Module) -> AdaptedModel | None:
    from tilpass.model import AdaptedModel

    return model if isinstance(model, AdaptedModel) else None


def unwrap_parallel(model: nn.Module) -> nn.Module:
    """The model inside torch's FSDP / DDP wrappers (the model itself otherwise)."""
    while type(model).__name__ in WRAPPERS and isinstance(
        getattr(model, "module", None), nn.Module
    ):
        model = model.module
    return model


def _layer_tensors(root: nn.Module, adapter_name: str, prefix: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path, layer in adapter_layers(root):
        for key, tensor in layer.adapter_tensors(adapter_name).items():
            out[f"{prefix}{path}.{key}"] = tensor
    return out


def get_peft_model_state_dict(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor] | None = None,
    adapter_name: str = "default",
    unwrap_compiled: bool = False,
    save_embedding_layers: bool | str = "auto",
) -> dict[str, torch.Tensor]:
    """The tensors of one adapter under PEFT's file keys (detached views, not copies).

    Works on an `AdaptedModel` (keys start with `base_model.model.`) and on a plain model that
    `inject_adapter_in_model` gave layers to (keys are the module paths). `state_dict`, if
    given, supplies the values (e.g. gathered from a sharded model) under the model's own
    parameter names.
    """
    if unwrap_compiled:
        model = getattr(model, "_orig_mod", model)
    model = unwrap_parallel(model)
    adapted = _adapted(model)
    root = adapted.base_model if adapted is not None else model
    prefix = PREFIX if adapted is not None else ""
    out = _layer_tensors(root, adapter_name, prefix)
    if not out and not any(adapter_name in layer.specs for _, layer in adapter_layers(root)):
        raise AdapterNameError(f"no adapter named {adapter_name!r} in {type(model).__name__}")
    if adapted is not None:
        config = adapted.peft_config[adapter_name]
        out.update(embedding_tensors(adapted, config, save_embedding_layers, PREFIX))
        out.update({PREFIX + k: v for k, v in adapted.trained_biases(adapter_name).items()})
    if state_dict is not None:
        out = {key: _value_from(state_dict, model, tensor) for key, tensor in out.items()}
    return {k: v.detach() for k, v in out.items()}


def _value_from(state_dict: dict[str, torch.Tensor], model: nn.Module, tensor: Any) -> Any:
    """The entry of `state_dict` that holds the same parameter as `tensor` (by name)."""
    for name, param in model.named_parameters():
        if param is tensor and name in state_dict:
            return state_dict[name]
    return tensor


def set_peft_model_state_dict(
    model: nn.Module,
    peft_model_state_dict: dict[str, torch.Tensor],
    adapter_name: str = "default",
    ignore_mismatched_sizes: bool = False,
    low_cpu_mem_usage: bool = False,
) -> _IncompatibleKeys:
    """Copy PEFT-keyed tensors into adapter `adapter_name`, as PEFT's function does.

    Not strict (PEFT's contract): matching keys are loaded and the rest reported as
    `missing_keys` (adapter tensors the dict lacks) and `unexpected_keys` (keys the adapter
    does not have). A key whose shape differs raises, unless `ignore_mismatched_sizes` skips
    it with a warning. Base biases in the dict (an adapter trained with `bias="all"` or
    `"lora_only"`) are copied into the model's biases, as PEFT does.
    """
    model = unwrap_parallel(model)
    adapted = _adapted(model)
    root = adapted.base_model if adapted is not None else model
    prefix = PREFIX if adapted is not None else ""
    materialize([layer for _, layer in adapter_layers(root)])  # low_cpu_mem_usage injection
    expected = _layer_tensors(root, adapter_name, prefix)
    if not expected:
        raise AdapterNameError(
            f"no adapter named {adapter_name!r} in {type(model).__name__}; add it first "
            "(inject_adapter_in_model, get_peft_model or add_adapter)"
        )
    given = {_with_prefix(k, prefix): v for k, v in peft_model_state_dict.items()}
    given = {k: v for k, v in given.items() if not k.endswith(".base_layer.weight")}
    # base biases an adapter trained (bias="all" / "lora_only") load too, as in PEFT
    biases = {prefix + k: v for k, v in all_biases(root, dict(adapter_layers(root))).items()}
    loadable = {**biases, **expected}
    mismatched = [k for k in given if k in loadable and given[k].shape != loadable[k].shape]
    if mismatched and not ignore_mismatched_sizes:
        key = mismatched[0]
        raise ValueError(
            f"size mismatch for {key}: copying a tensor of shape {tuple(given[key].shape)}, the "
            f"adapter has {tuple(loadable[key].shape)} (pass ignore_mismatched_sizes=True to "
            "skip such keys)"
        )
    if mismatched:
        warnings.warn(f"skipped tensors whose shapes differ: {mismatched}", stacklevel=2)
    with torch.no_grad():
        for key in set(loadable) & set(given) - set(mismatched):
            loadable[key].copy_(given[key])
    for _, layer in adapter_layers(root):
        layer.invalidate()
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(loadable))
    return _IncompatibleKeys(missing, unexpected)


def _with_prefix(key: str, prefix: str) -> str:
    """A key in the model's form: PEFT's prefix added or removed, and an adapter name after
    `lora_A.` / `lora_B.` (as a model's own state dict has it) dropped."""
    key = re.sub(r"\.(lora_[AB])\.[^.]+\.weight$", r".\1.weight", key)
    if prefix and not key.startswith(prefix):
        return prefix + key
    if not prefix and key.startswith(PREFIX):
        return key[len(PREFIX) :]
    return key


def inject_adapter_in_model(
    peft_config: AdapterConfig,
    model: nn.Module,
    adapter_name: str = "default",
    low_cpu_mem_usage: bool = False,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Wrap the modules `peft_config` targets in `model` itself and return `model` (no
    `AdaptedModel` around it): the base is frozen, the new adapter is active and trains.
    With `low_cpu_mem_usage` its tensors are empty, on the meta device, as in PEFT: load them
    with `set_peft_model_state_dict` before use."""
    from tilpass.model import AdaptedModel

    if state_dict is not None:
        raise NotImplementedError(
            "inject_adapter_in_model(state_dict=...) is not supported by tilpass; name the "
            "modules in the config's target_modules instead"
        )
    layers = [layer for _, layer in adapter_layers(model)]
    if any(adapter_name in layer.specs for layer in layers):
        raise ValueError(f"Adapter with name {adapter_name!r} already exists in the model")
    training = [p for layer in layers for n in layer.specs for p in layer.adapter_parameters(n)]
    training = [p for p in training if p.requires_grad]
    adapted = AdaptedModel(model)  # a wrapper for this call only; it freezes the base
    adapted.add_adapter(adapter_name, peft_config, low_cpu_mem_usage=low_cpu_mem_usage)
    for layer in adapted.adapter_layer_list():
        if adapter_name in layer.specs:
            layer.active = [adapter_name]
    adapted.set_requires_grad(adapter_name, not peft_config.inference_mode)
    for p in training:  # adapters injected before keep training
        p.requires_grad_(True)
    if low_cpu_mem_usage:  # PEFT's meaning here: empty tensors on the meta device
        to_meta(adapted.adapter_layer_list(), adapter_name)
    return model


def embedding_tensors(
    model: AdaptedModel, config: AdapterConfig, save_embedding_layers: bool | str, prefix: str
) -> dict[str, torch.Tensor]:
    """The base embedding weights PEFT saves beside the adapter: with `True`, or with `"auto"`
    when `target_modules` names an embedding layer (`embed_tokens`, `lm_head`)."""
    if save_embedding_layers not in (True, False, "auto"):
        raise ValueError(
            f"save_embedding_layers must be True, False or 'auto', not {save_embedding_layers!r}"
        )
    targets = getattr(config, "target_modules", None) or []
    if save_embedding_layers == "auto":
        if isinstance(targets, str):
            save = any(
                re.fullmatch(targets, n) and n.split(".")[-1] in EMBEDDING_LAYER_NAMES
                for n, _ in model.base_model.named_modules()
            )
        else:
            save = any(t.split(".")[-1] in EMBEDDING_LAYER_NAMES for t in targets)
        if save:
            warnings.warn(
                "Setting `save_embedding_layers` to `True` as embedding layers found in "
                "`target_modules`.",
                stacklevel=4,
            )
    else:
        save = bool(save_embedding_layers)
    if not save:
        return {}
    base = model.base_model
    getters = [
        getattr(base, "get_input_embeddings", None),
        getattr(base, "get_output_embeddings", None),
    ]
    if not all(callable(g) for g in getters):
        warnings.warn(
            "Could not identify embedding layer(s) because the model is not a 🤗 transformers "
            "model.",
            stacklevel=4,
        )
        return {}
    out = {}
    for getter in getters:
        layer = getter()
        for path, module in base.named_modules():
            if module is layer and isinstance(module, AdapterLayer) and hasattr(module, "weight"):
                out[f"{prefix}{path}.base_layer.weight"] = module.weight
    return out
