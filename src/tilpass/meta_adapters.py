"""Adapter tensors on PyTorch's `meta` device: PEFT's `low_cpu_mem_usage=True` for
`inject_adapter_in_model`, which allocates no memory for adapters whose values are loaded
next (`set_peft_model_state_dict` then gives them real storage on their layer's device).
"""

from __future__ import annotations

import torch
from torch import nn

from tilpass.layers import AdapterLayer
from tilpass.saved_modules import ModulesToSave


def _slots(layer: AdapterLayer) -> list[tuple[nn.ParameterDict, str]]:
    """(store, adapter name) for every parameter the layer keeps per adapter."""
    out = []
    for store in layer.STORES:
        holder = getattr(layer, store)
        if isinstance(holder, nn.ParameterDict):
            out += [(holder, name) for name in holder]
    return out


def to_meta(layers: list[AdapterLayer], adapter_name: str) -> None:
    """Replace adapter `adapter_name`'s tensors by empty ones on the meta device (a
    `modules_to_save` copy keeps its values: it starts as the original module)."""
    for layer in layers:
        if isinstance(layer, ModulesToSave):
            continue
        for holder, name in _slots(layer):
            if name == adapter_name:
                old = holder[name]
                holder[name] = nn.Parameter(
                    torch.empty_like(old, device="meta"), requires_grad=old.requires_grad
                )
        layer.invalidate()


def materialize(layers: list[AdapterLayer]) -> None:
    """Give every meta adapter tensor real (zeroed) storage on its layer's device, so it can
    be loaded into."""
    for layer in layers:
        device = next((p.device for p in layer.parameters() if not p.is_meta), None)
        for holder, name in _slots(layer):
            old = holder[name]
            if old.is_meta:
                fresh = torch.zeros(old.shape, dtype=old.dtype, device=device or "cpu")
                holder[name] = nn.Parameter(fresh, requires_grad=old.requires_grad)
                layer.invalidate()
