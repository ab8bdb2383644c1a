"""Saving a PiSSA / OLoRA adapter as a plain LoRA adapter of the unmodified base model: PEFT's
`save_pretrained(..., path_initial_model_for_weight_conversion=...)`.

PiSSA and OLoRA replace the base weight W by a residual, W = W_res + s B0 A0, and train
W_res + s B A. Against the original W the trained change is

    s (B A - B0 A0) = s [B | -B0] [A ; A0]

a LoRA adapter of rank 2r. Doubling r and alpha keeps s = alpha / r (with rsLoRA,
s = alpha / sqrt(r), alpha is multiplied by sqrt 2 instead), so the converted adapter loads
onto the original base model, beside any other adapter, and gives the trained outputs.
(B0, A0) come from the adapter saved right after `get_peft_model`, before training: the
"initial model" directory.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tilpass.adapter_files import WEIGHTS_NAME, load_tensors
from tilpass.errors import AdapterFileError
from tilpass.methods.lora.init import mutates_base

if TYPE_CHECKING:
    from tilpass.methods.lora.config import LoraConfig

FACTOR_DIMS = {"lora_A.weight": 0, "lora_B.weight": 1}
"""File-key suffix of each factor -> the dimension its rank runs along."""


def check_convertible(config: LoraConfig) -> None:
    """Raise for the settings whose conversion PEFT refuses, and warn when there is nothing
    to convert (the adapter did not change the base weight)."""
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise ValueError(
            "Passing `path_initial_model_for_weight_conversion` to `save_pretrained` is not "
            "supported when using `rank_pattern` or `alpha_pattern` at the same time as "
            "`use_rslora=True`: the converted adapter's per-layer scale cannot be written. Save "
            "without the conversion (and load the adapter onto the residual base model)."
        )
    if config.use_dora:
        raise ValueError(
            "Passing `path_initial_model_for_weight_conversion` to `save_pretrained` is not "
            "supported with use_dora=True: DoRA's magnitude depends on the base weight, so the "
            "difference of two DoRA adapters is no DoRA adapter. Save without the conversion."
        )
    if not (mutates_base(config.init_lora_weights) or config.init_lora_weights is True):
        warnings.warn(
            "`path_initial_model_for_weight_conversion` only works for converting a PiSSA/OLoRA "
            f"adapter to a LoRA adapter; this one has init_lora_weights="
            f"{config.init_lora_weights!r}",
            stacklevel=5,
        )


def convert_to_lora(
    config: LoraConfig, tensors: dict[str, torch.Tensor], initial: Path
) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """The (config, tensors) of the plain LoRA adapter equal to `tensors` (a PiSSA / OLoRA
    adapter under PEFT's keys) on the base model before its initialisation, with (B0, A0)
    read from the adapter directory `initial`.

    As PEFT does, `initial`'s `adapter_config.json` is rewritten with
    `init_lora_weights=True`, so loading that directory later does not change the base
    weights again. `config` and `tensors` are not changed.
    """
    check_convertible(config)
    start = _initial_tensors(initial)
    where = initial / WEIGHTS_NAME
    out = {}
    for key, value in tensors.items():
        dim = next((d for suffix, d in FACTOR_DIMS.items() if key.endswith(suffix)), None)
        if dim is None:
            out[key] = value
            continue
        if key not in start or start[key].shape != value.shape:
            found = tuple(start[key].shape) if key in start else "no such key"
            raise AdapterFileError(
                f"{where}: {key} should be the initial value of the adapter's tensor of shape "
                f"{tuple(value.shape)}, found {found}; pass the directory saved right after "
                "get_peft_model, before training, with the same config"
            )
        first = start[key].to(device=value.device, dtype=value.dtype)
        out[key] = torch.cat([value.detach(), first if dim == 0 else -first], dim=dim)
    initial_config = copy.deepcopy(config)
    initial_config.init_lora_weights = True
    initial_config.save(initial)
    return doubled(config), out


def doubled(config: LoraConfig) -> LoraConfig:
    """The converted adapter's config: rank 2r with the same scale, initialised as plain LoRA."""
    out = copy.deepcopy(config)
    out.init_lora_weights = True
    out.r = 2 * config.r
    # s = alpha / r keeps with alpha doubled; s = alpha / sqrt(r) with alpha times sqrt(2).
    out.lora_alpha = config.lora_alpha * (2**0.5 if config.use_rslora else 2)
    out.rank_pattern = {k: 2 * v for k, v in config.rank_pattern.items()}
    out.alpha_pattern = {k: 2 * v for k, v in config.alpha_pattern.items()}
    return out


def _initial_tensors(initial: Path) -> dict[str, torch.Tensor]:
    if not (initial / WEIGHTS_NAME).is_file():
        raise AdapterFileError(
            f"{initial}: no {WEIGHTS_NAME}; path_initial_model_for_weight_conversion is the "
            "directory where the adapter was saved right after get_peft_model, before training"
        )
    return load_tensors(initial)
