"""The method registry's types and look-ups (`tilpass.methods` fills it).

Each method lives in one file (or package) under `methods/` and describes itself with a
`Method`: its YAML/CLI name, its config class (whose `PEFT_TYPE` is the `peft_type` of its
files) and its layer factory. The core (`model.py`, `inject.py`, the file loader, the CLI)
looks methods up here and holds no method name of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from tilpass.config import AdapterConfig
from tilpass.errors import TilpassError


@dataclass(frozen=True)
class MethodReport:
    """What a method says about a trained adapter at the end of a run and in its model card.

    Attributes:
        title: the section's heading.
        lines: Markdown lines (a small table, a summary line).
        figure: a matplotlib figure saved beside the adapter as `figure_name`, or None.
    """

    title: str
    lines: list[str]
    figure: Any = None
    figure_name: str = ""


@dataclass(frozen=True)
class Method:
    """One adaptation method as the core sees it.

    Attributes:
        name: the name in YAML files and on the command line (`lora`).
        config_class: its config dataclass; `config_class.PEFT_TYPE` names it in files.
        make_layer: builds the adapter layer that wraps one targeted module.
        description: one line for `tilpass train --help`.
        select_targets: (model, config) -> names of the modules to wrap; None = the
            core's name matching (`inject.find_targets`: target_modules & co.).
        training_hooks: (adapted model, adapter name) -> objects with `loss_term(step)` and /
            or `after_backward(step)` for the trainer; None = the method needs none.
        owns_layer: layer -> whether this method's adapters go into that existing layer; None
            = layers built by `make_layer`'s own module (a method that combines others' layers
            names them here).
        prefix: the start of its adapter parameters' names (PEFT's `model.prefix`, "lora_").
        add_weighted: (adapted model, adapters, weights, new name, combination type, settings:
            `svd_*`, `density`, `majority_sign_method`) -> None, for `add_weighted_adapter`;
            None = the method cannot combine.
        tie_layer: (layer of a module tied to the input embedding, the embedding's layer,
            adapter name) -> make the layer use the embedding's adapter tensors, so the tie
            holds (`ensure_weight_tying`, `weight_tying.py`); None = the method cannot tie.
    """

    name: str
    config_class: type[AdapterConfig]
    make_layer: Callable[[nn.Module], Any]
    description: str
    select_targets: Callable[[nn.Module, Any], list[str]] | None = None
    training_hooks: Callable[[nn.Module, str], list[Any]] | None = None
    owns_layer: Callable[[nn.Module], bool] | None = None
    prefix: str = ""
    add_weighted: Callable[..., None] | None = None
    report: Callable[[nn.Module, str], MethodReport | None] | None = None
    tie_layer: Callable[[Any, Any, str], None] | None = None

    @property
    def peft_type(self) -> str:
        """The `peft_type` written in this method's `adapter_config.json`."""
        return self.config_class.PEFT_TYPE


class UnknownMethodError(TilpassError, ValueError):
    """A method name or `peft_type` that no registered method has."""


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method to the registry (its name and peft_type must be new)."""
    if method.name in METHODS or any(m.peft_type == method.peft_type for m in METHODS.values()):
        raise ValueError(f"method {method.name!r} ({method.peft_type}) is already registered")
    METHODS[method.name] = method
    return method


def method_named(name: str) -> Method:
    """The method called `name` in YAML / on the command line."""
    try:
        return METHODS[name]
    except KeyError:
        raise UnknownMethodError(
            f"unknown method {name!r}; registered methods: {', '.join(METHODS)}"
        ) from None


def method_for_peft_type(peft_type: str) -> Method:
    """The method whose files carry `peft_type` (as PEFT writes it, e.g. "LORA")."""
    for method in METHODS.values():
        if method.peft_type == peft_type:
            return method
    supported = ", ".join(m.peft_type for m in METHODS.values())
    raise UnknownMethodError(
        f"peft_type {peft_type!r} is not supported by tilpass (supported: {supported})"
    )


def method_of(config: AdapterConfig) -> Method:
    """The method a config object belongs to."""
    for method in METHODS.values():
        if type(config) is method.config_class:
            return method
    return method_for_peft_type(config.peft_type)
