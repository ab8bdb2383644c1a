"""Adaptation methods, one file (or package) each, and the registry that lists them.

The registry is the one place that knows which methods exist: `model.py`, `inject.py`, the
file loader and the CLI look methods up here (`method_named`, `method_for_peft_type`,
`method_of`). Adding a method is one file under `methods/` that defines a `Method`, and one
`register` line below.
"""

from __future__ import annotations

from tilpass.methods.adalora import METHOD as ADALORA
from tilpass.methods.bottleneck import METHOD as BOTTLENECK
from tilpass.methods.ia3 import METHOD as IA3
from tilpass.methods.lora import METHOD as LORA
from tilpass.methods.lora_prompt import METHOD as LORA_PROMPT
from tilpass.methods.prompt import METHOD as PROMPT_TUNING
from tilpass.methods.registry import (
    METHODS,
    Method,
    MethodReport,
    UnknownMethodError,
    method_for_peft_type,
    method_named,
    method_of,
    register,
)

register(LORA)
register(IA3)
register(BOTTLENECK)
register(PROMPT_TUNING)
register(LORA_PROMPT)
register(ADALORA)

__all__ = [
    "METHODS",
    "Method",
    "MethodReport",
    "UnknownMethodError",
    "method_for_peft_type",
    "method_named",
    "method_of",
    "register",
]
