"""PEFT's LoRA hot-swapping: replace a loaded adapter's tensors by another adapter's in place.

`hotswap_adapter(model, directory, adapter_name)` keeps the adapter's name, layers and
Parameter objects (so an optimizer, a `torch.compile`d graph or a server holding them keeps
working) and copies the new adapter's tensors into them, with its rank and alpha:

- a key of the new adapter that the model lacks (a module the loaded one does not adapt) is
  refused, naming it, before anything changes;
- a tensor the new adapter lacks is zeroed, so that module no longer contributes;
- a smaller rank is copied into the first rows of A / columns of B, the rest zeroed (a
  grouped convolution's A block by block, one block of rows per group); the layer keeps its
  larger rank and the scale s = alpha / r of the new adapter, carried by
  `AdapterSpec.alpha`; a larger rank replaces the tensors' storage (same Parameters).

`prepare_model_for_compiled_hotswap(model, target_rank=R)` pads every LoRA adapter to rank R
with zeros first (the output is unchanged: the padded rows and columns multiply to zero), so
that later swaps never change a tensor's shape.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tilpass.adapter_files import load_tensors
from tilpass.config import AdapterConfig
from tilpass.inject import adapter_layers
from tilpass.methods.lora.config import LoraConfig, pattern_value
from tilpass.methods.lora.layers import AdapterSpec, LoraLayer

PREFIX = "base_model.model."
CONFIG_KEYS_TO_CHECK = ("use_rslora", "lora_dropout", "alpha_pattern", "use_dora")
"""Settings that change an adapter's output beyond its tensors, rank and alpha (PEFT's list):
two adapters must agree on them to be swapped."""
NOT_FOUND = (
    "No adapter layers found on the model, make sure call `prepare_model_for_compiled_hotswap` "
    "after loading the first adapter and before loading the second adapter."
)


def check_hotswap_configs_compatible(config0: AdapterConfig, config1: AdapterConfig) -> None:
    """Raise `ValueError` unless adapters with these configs can replace each other."""
    if config0.peft_type != config1.peft_type:
        raise ValueError(
            f"Incompatible PEFT types found: {config0.peft_type} and {config1.peft_type}"
        )
    if not isinstance(config0, LoraConfig) or not isinstance(config1, LoraConfig):
        raise ValueError(f"Hotswapping only supports LORA but {config1.peft_type} was passed.")
    for key in CONFIG_KEYS_TO_CHECK:
        val0, val1 = getattr(config0, key), getattr(config1, key)
        if val0 != val1:
            raise ValueError(f"Configs are incompatible: for {key}, {val0} != {val1}")


def hotswap_adapter(
    model: Any,
    model_name_or_path: str | Path,
    adapter_name: str,
    torch_device: str | torch.device | None = None,
    **kwargs: Any,
) -> None:
    """Replace adapter `adapter_name`'s tensors by those of the adapter directory
    `model_name_or_path` (PEFT's function; see the module docstring)."""
    from tilpass.model_files import read_adapter_config  # model_files imports the registry

    directory = Path(model_name_or_path)
    model.check_adapter_name(adapter_name)
    config = read_adapter_config(directory, is_trainable=False)
    check_hotswap_configs_compatible(model.peft_config[adapter_name], config)
    tensors = load_tensors(directory, allow_pickle=bool(kwargs.get("allow_pickle", False)))
    if torch_device is not None:
        tensors = {k: v.to(torch_device) for k, v in tensors.items()}
    hotswap_adapter_from_state_dict(model, tensors, adapter_name, config)


def hotswap_adapter_from_state_dict(
    model: Any, state_dict: dict[str, torch.Tensor], adapter_name: str, config: LoraConfig
) -> None:
    """Swap adapter `adapter_name`'s tensors for `state_dict`'s (PEFT's file keys, as
    `save_pretrained` writes them); checks everything before changing anything."""
    layers = _lora_layers(model, adapter_name)
    if any(adapter_name in layer.merged for _, layer in layers):
        raise ValueError(
            f"Cannot hot-swap adapter '{adapter_name}' because it is currently merged into the "
            "base weights. Please unmerge the adapter first by calling "
            "`peft_model.unmerge_adapter()`; unmerging after a swap of merged weights would "
            "otherwise corrupt them."
        )
    current = model.adapter_state_dict(adapter_name)
    unexpected = [k for k in state_dict if k not in current]
    if unexpected:
        shown = ", ".join(_with_adapter_name(k, adapter_name) for k in unexpected)
        raise RuntimeError(
            f"Hot swapping the adapter did not succeed, unexpected keys found: {shown}. The new "
            "adapter adapts modules the loaded one does not; load it with load_adapter instead."
        )
    with torch.no_grad():
        for path, layer in layers:
            _swap_layer(layer, path, adapter_name, state_dict, config)
        for key, tensor in current.items():  # modules_to_save copies, trained biases
            inside = any(key.startswith(f"{PREFIX}{path}.") for path, _ in layers)
            if not inside and key in state_dict:  # one the new adapter lacks stays as it is
                _copy_same_shape(tensor, state_dict[key], key)
    for _, layer in adapter_layers(model.base_model):
        layer.invalidate()


def _lora_layers(model: Any, adapter_name: str) -> list[tuple[str, LoraLayer]]:
    return [
        (path, layer)
        for path, layer in adapter_layers(model.base_model)
        if isinstance(layer, LoraLayer) and adapter_name in layer.specs
    ]


def _with_adapter_name(key: str, adapter_name: str) -> str:
    """A file key as the model's own key names it, with the adapter name inserted
    (`...lora_A.weight` -> `...lora_A.default.weight`), as PEFT reports it."""
    head, sep, suffix = key.rpartition("lora_")
    if not sep:
        return key
    part, dot, rest = suffix.partition(".")
    return f"{head}lora_{part}.{adapter_name}{dot}{rest}" if dot else f"{key}.{adapter_name}"


def _swap_layer(
    layer: LoraLayer, path: str, name: str, state: dict[str, torch.Tensor], config: LoraConfig
) -> None:
    """Copy one layer's new tensors in (zeroing those the new adapter lacks) and give its
    spec the new adapter's scale at the rank the tensors now have."""
    rank = int(pattern_value(config.rank_pattern, path, config.r))
    alpha = float(pattern_value(config.alpha_pattern, path, config.lora_alpha))
    scale = alpha / (math.sqrt(rank) if config.use_rslora else rank)
    ranks = {id(layer.lora_a[name]): 0, id(layer.lora_b[name]): 1}
    for suffix, tensor in layer.adapter_tensors(name).items():
        key = f"{PREFIX}{path}.{suffix}"
        new = state.get(key)
        dim = ranks.get(id(tensor))
        if new is None or dim is None or new.shape == tensor.shape:
            _copy_same_shape(tensor, new, key)
        else:
            _copy_rank(layer, tensor, new.to(tensor.dtype), dim, key)
    spec = layer.specs[name]
    held = layer.lora_a[name].shape[0]
    equivalent = scale * (math.sqrt(held) if spec.use_rslora else held)
    layer.specs[name] = dataclasses.replace(spec, r=held, alpha=equivalent)


def _copy_same_shape(tensor: torch.Tensor, new: torch.Tensor | None, key: str) -> None:
    if new is None:
        tensor.zero_()  # the new adapter leaves this module alone
        return
    if new.shape != tensor.shape:
        raise ValueError(
            f"Incompatible shapes found for {key}: {tuple(tensor.shape)} loaded, "
            f"{tuple(new.shape)} in the new adapter; hot-swapping needs adapters trained on the "
            "same base model and modules"
        )
    tensor.copy_(new)


def _copy_rank(
    layer: LoraLayer, tensor: torch.Tensor, new: torch.Tensor, dim: int, key: str
) -> None:
    """Copy a factor of another rank: a smaller one into the leading slice (rest zero), a
    larger one by replacing the Parameter's storage."""
    other = [d for d in range(new.dim()) if d != dim]
    if new.dim() != tensor.dim() or any(new.shape[d] != tensor.shape[d] for d in other):
        _copy_same_shape(tensor, new, key)  # raises, naming the shapes
    if new.shape[dim] > tensor.shape[dim]:
        tensor.data = new.clone()  # type: ignore[misc]  # the same Parameter, a larger rank
        return
    tensor.zero_()
    copy_leading(tensor, new, dim, groups_of(layer) if dim == 0 else 1)


def groups_of(layer: LoraLayer) -> int:
    """A convolution's groups (1 for other layers): its B is grouped, so A's rows (rank
    channels) come in `groups` blocks, one per group."""
    return int(getattr(layer, "groups", 1))


def copy_leading(dst: torch.Tensor, src: torch.Tensor, dim: int, groups: int = 1) -> None:
    """Copy `src` into the leading part of `dst` along `dim` (the rest untouched); with
    `groups`, into the leading part of each of the `groups` equal blocks."""
    size, block = src.shape[dim] // groups, dst.shape[dim] // groups
    for group in range(groups):
        dst.narrow(dim, group * block, size).copy_(src.narrow(dim, group * size, size))


def prepare_model_for_compiled_hotswap(
    model: Any,
    *,
    target_rank: int | None = None,
    config: LoraConfig | dict[str, LoraConfig] | None = None,
    check_compiled: str = "error",
) -> None:
    """Pad every LoRA adapter of `model` to `target_rank` with zeros (outputs unchanged), so
    later `hotswap_adapter` calls never change a tensor's shape; call it after loading the
    first adapter and before `torch.compile`. With `config`, its ranks become `target_rank`."""
    _check_not_compiled(model, check_compiled)
    layers = [
        (path, layer)
        for path, layer in adapter_layers(getattr(model, "base_model", model))
        if isinstance(layer, LoraLayer) and layer.specs
    ]
    if not layers:
        raise ValueError(NOT_FOUND)
    if target_rank is None:
        return
    for _, layer in layers:  # every check first: a refusal leaves the model as it was
        for name in layer.specs:
            _check_padding(layer, name, target_rank)
    for _, layer in layers:
        for name in list(layer.specs):
            _pad(layer, name, target_rank)
        layer.invalidate()
    configs = config.values() if isinstance(config, dict) else [config] if config else []
    for item in configs:
        item.r = target_rank
        for key in item.rank_pattern:
            item.rank_pattern[key] = target_rank


def _check_not_compiled(model: Any, check_compiled: str) -> None:
    if check_compiled not in ("error", "warn", "ignore"):
        raise ValueError(
            "check_compiles should be one of 'error', 'warn', or 'ignore', got "
            f"'{check_compiled}' instead."
        )
    if not (hasattr(model, "_orig_mod") or getattr(model, "_compiled_call_impl", False)):
        return
    if check_compiled == "error":
        raise ValueError("Call prepare_model_for_compiled_hotswap *before* compiling the model")
    if check_compiled == "warn":
        warnings.warn(
            "prepare_model_for_compiled_hotswap was called with a model that is already "
            "compiled. This will likely result in re-compilation, hurting performance. Call the "
            "function before compiling the model.",
            stacklevel=3,
        )


def _check_padding(layer: LoraLayer, name: str, target_rank: int) -> None:
    """Raise unless adapter `name` of `layer` can be padded to `target_rank`."""
    spec = layer.specs[name]
    if spec.r == target_rank or type(spec) is not AdapterSpec:  # AdaLoRA: not hot-swapped
        return
    if spec.r > target_rank:
        raise ValueError(
            f"Trying to pad the adapter to the target rank {target_rank}, but the original rank "
            f"is larger ({spec.r}). This is not possible; pass the largest rank of the adapters "
            "you will swap in."
        )
    groups = groups_of(layer)
    if target_rank % groups:
        raise ValueError(
            f"Trying to pad a Conv2d LoRA adapter with groups={groups} to target rank "
            f"{target_rank}, but the target rank is not divisible by {groups}. Please choose a "
            f"target rank that is divisible by {groups}."
        )


def _pad(layer: LoraLayer, name: str, target_rank: int) -> None:
    """Zero-pad adapter `name`'s A rows and B columns to `target_rank`, keeping its scale."""
    spec = layer.specs[name]
    if spec.r == target_rank or type(spec) is not AdapterSpec:
        return
    groups = groups_of(layer)
    _pad_parameter(layer.lora_a[name], 0, target_rank, groups)
    _pad_parameter(layer.lora_b[name], 1, target_rank // groups)  # B: (out, r / groups, ...)
    equivalent = spec.scale * (math.sqrt(target_rank) if spec.use_rslora else target_rank)
    layer.specs[name] = dataclasses.replace(spec, r=target_rank, alpha=equivalent)


def _pad_parameter(param: nn.Parameter, dim: int, size: int, groups: int = 1) -> None:
    shape = list(param.shape)
    shape[dim] = size
    padded = param.new_zeros(shape)
    copy_leading(padded, param.detach(), dim, groups)
    param.data = padded
