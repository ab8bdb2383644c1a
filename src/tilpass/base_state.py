"""PEFT's `get_base_model_state_dict` / `set_base_model_state_dict`: the base model's own
tensors of an adapted model, under the base model's own keys.

tilpass's adapter layers keep the wrapped module's tensors under their own names
(`q_proj.weight`), so the base keys are the model's keys less the adapters' stores
(`lora_A`, `modules_to_save`, ...) and with `modules_to_save`'s `original_module.` infix
removed. Useful to save or restore base weights (after sharding, say) without the adapters.
"""

from __future__ import annotations

from collections import namedtuple
from typing import Any

import torch
from torch import nn

from tilpass.inject import adapter_layers
from tilpass.saved_modules import ModulesToSave

IncompatibleKeys = namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])


def _root(model: nn.Module) -> nn.Module:
    """The base model of an `AdaptedModel` (a plain model with injected layers itself)."""
    from tilpass.model import AdaptedModel

    return model.base_model if isinstance(model, AdaptedModel) else model


def base_keys(root: nn.Module) -> dict[str, str]:
    """The model's state-dict keys of base tensors -> the base model's own keys."""
    skip, renames = [], []
    for path, layer in adapter_layers(root):
        dot = f"{path}." if path else ""
        skip += [f"{dot}{store}." for store in layer.STORES]
        if isinstance(layer, ModulesToSave):
            renames.append((f"{dot}original_module.", dot))
    out = {}
    for key in root.state_dict():
        if any(key.startswith(s) for s in skip):
            continue
        original = key
        for infix, plain in renames:
            if key.startswith(infix):
                original = plain + key[len(infix) :]
        out[key] = original
    return out


def get_base_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict under its original keys, the adapters' tensors left out."""
    root = _root(model)
    state = root.state_dict()
    return {original: state[key] for key, original in base_keys(root).items()}


def set_base_model_state_dict(
    model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True
) -> Any:
    """Load base tensors given under the base model's original keys (the inverse of
    `get_base_model_state_dict`); returns `missing_keys` and `unexpected_keys`. With `strict`
    a key missing or unknown raises `RuntimeError` and nothing is loaded."""
    root = _root(model)
    to_model = {original: key for key, original in base_keys(root).items()}
    unexpected = [k for k in state_dict if k not in to_model]
    missing = [k for k in to_model if k not in state_dict]
    if strict and (missing or unexpected):
        raise RuntimeError(
            f"Error(s) in loading the base model's state_dict: missing keys {missing}, "
            f"unexpected keys {unexpected}; pass strict=False to load the matching keys"
        )
    mapped = {to_model[k]: v for k, v in state_dict.items() if k in to_model}
    root.load_state_dict(mapped, strict=False)
    return IncompatibleKeys(missing_keys=missing, unexpected_keys=unexpected)
