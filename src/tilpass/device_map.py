"""PEFT's and transformers' `device_map` argument, for loading an adapter onto a base model.

tilpass creates each adapter tensor on the device of the module it adapts, so a base model
that `transformers` already spread over devices (`device_map="auto"` when it was loaded) needs
nothing more. A `device_map` given when loading an adapter is therefore one of:

- `"auto"`, `"balanced"`, `"balanced_low_0"`, `"sequential"`: keep the model where it is (each
  adapter tensor follows its layer);
- one device (`"cpu"`, `"cuda:0"`, `0`, `torch.device(...)`) or a dict whose values all name
  that one device (`{"": "cpu"}`): the model, base and adapter, is moved there;
- a dict over several devices, or one with `"disk"`: refused, since tilpass does not dispatch
  models itself (load the base model with that `device_map` in `transformers` instead).
"""

from __future__ import annotations

from typing import Any

import torch

PLACEMENTS = ("auto", "balanced", "balanced_low_0", "sequential")


def target_device(device_map: Any) -> torch.device | None:
    """The one device `device_map` puts the model on, or None to leave it where it is."""
    if device_map is None or device_map in PLACEMENTS:
        return None
    if isinstance(device_map, dict):
        devices = {_device(value) for value in device_map.values()}
    else:
        devices = {_device(device_map)}
    if len(devices) != 1:
        shown = ", ".join(sorted(str(d) for d in devices)) or "no device"
        raise NotImplementedError(
            f"device_map names {shown}: tilpass does not spread a model over devices itself. "
            "Load the base model with transformers' device_map=... and leave device_map out "
            "here (each adapter tensor is created on its layer's device), or give one device"
        )
    return devices.pop()


def _device(value: Any) -> torch.device:
    """One `device_map` value as a torch device (an int is a CUDA index, as in accelerate)."""
    if value == "disk":
        raise NotImplementedError(
            "device_map with 'disk' (offloading weights to disk) is not supported by tilpass; "
            "keep the model in memory on one device"
        )
    try:
        return torch.device(f"cuda:{value}" if isinstance(value, int) else value)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"device_map value {value!r} is not a device: give 'cpu', 'cuda:0', a GPU index, "
            f"a dict of module name -> device, or one of {', '.join(PLACEMENTS)}"
        ) from None
