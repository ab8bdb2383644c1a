"""PEFT's checks of a LoRA layer's settings against the module it wraps, shared by the layer
kinds: a warning for `lora_bias` on a module without a bias, and the refusal of PiSSA / OLoRA
on a quantized weight (which cannot hold their residual)."""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from tilpass.errors import PeftWarning
from tilpass.layers import is_quantized
from tilpass.methods.lora.init import mutates_base


def warn_if_no_base_bias(base: nn.Module, spec: Any) -> None:
    """PEFT's warning: with `lora_bias=True` on a layer without a bias, the adapter trains and
    runs, but cannot be merged (there is no base bias to add B's bias to)."""
    if spec.lora_bias and getattr(base, "bias", None) is None:
        warnings.warn(
            f"`lora_bias=True` was passed but the targeted layer of type {type(base).__name__} "
            "has no bias. This means that merging LoRA weights won't be possible. Set "
            "lora_bias=False (or leave this layer out) to keep the adapter mergeable.",
            PeftWarning,
            stacklevel=2,
        )


def check_residual_fits(base: nn.Module, init: Any) -> None:
    """Raise for PiSSA / OLoRA on a quantized base: they replace the weight by a residual,
    which a quantized weight cannot hold (PEFT refuses them there too)."""
    if mutates_base(init) and is_quantized(base):
        raise TypeError(
            f"init_lora_weights={init!r} replaces the base weight by a residual, which a "
            "quantized weight cannot hold; initialise (or load) before quantizing the base "
            "model, or save the adapter converted with path_initial_model_for_weight_conversion"
        )
