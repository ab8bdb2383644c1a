"""Probes that note when a PEFT test looks at PEFT's implementation rather than its API.

Three general rules, each about what the test itself does (its own code, in PEFT's `tests/`
folder), never about which test it is:

- it hands a tilpass object to one of PEFT's private functions (a name starting with `_`,
  imported from `peft`): those work on PEFT's own object layout;
- it asks whether a tilpass adapter layer is an instance of one of PEFT's classes
  (`isinstance(module, BaseTunerLayer)`) and gets False: it picks layers by PEFT's class
  hierarchy, which tilpass's layers are not part of;
- it reads a private attribute (`_name`) of a tilpass adapter layer that the layer lacks
  (PEFT's caches and bookkeeping, e.g. `_dora_cache`).

Each probe calls `note(reason)` with the current test's reason; the plugin records it as the
test's `peft_internals`, and `report.py` classes a failure with it as PEFT internals.
"""

from __future__ import annotations

import abc
import functools
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

Note = Callable[[str], None]


def is_peft_name(name: str) -> bool:
    """Whether a module name is PEFT's own (`peft` or `peft.<...>`)."""
    return name == "peft" or name.startswith("peft.")


def is_tilpass_object(value: object) -> bool:
    """Whether `value` is an instance of one of tilpass's classes."""
    module = type(value).__module__ or ""
    return module == "tilpass" or module.startswith("tilpass.")


def called_from_tests(depth: int) -> bool:
    """Whether the frame `depth` levels up runs code of a file in a `tests` folder (PEFT's test
    files), not library code."""
    try:
        frame = sys._getframe(depth + 1)
    except ValueError:
        return False
    path = Path(frame.f_code.co_filename)
    return path.parent.name == "tests" and "site-packages" not in path.parts


def is_private_peft_function(value: object) -> bool:
    """A function defined in PEFT whose own name is private (`_get_submodules`)."""
    if not isinstance(value, types.FunctionType):
        return False
    name = value.__name__
    return (
        is_peft_name(value.__module__ or "") and name.startswith("_") and not name.startswith("__")
    )


def watch_private_functions(module: types.ModuleType, note: Note) -> list[str]:
    """Wrap PEFT's private functions that a test module imported, so a call handing them a
    tilpass object is noted; returns the names wrapped."""
    wrapped = []
    for name, value in list(vars(module).items()):
        if is_private_peft_function(value):
            setattr(module, name, _noting_call(value, note))
            wrapped.append(name)
    return wrapped


def _noting_call(function: Callable[..., Any], note: Note) -> Callable[..., Any]:
    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> Any:
        if any(is_tilpass_object(v) for v in (*args, *kwargs.values())):
            note(f"hands a tilpass object to PEFT's private {function.__name__}")
        return function(*args, **kwargs)

    return call


class LayoutProbes:
    """The isinstance and private-attribute probes, installed for a tilpass run.

    Args:
        note: called with a reason when the current test does one of the things above.
        layer_class: tilpass's adapter-layer base class (its instances are the layers).
    """

    def __init__(self, note: Note, layer_class: type) -> None:
        self.note = note
        self.layer_class = layer_class
        self.instancecheck = abc.ABCMeta.__instancecheck__
        self.layer_getattr = layer_class.__getattr__

    def install(self) -> None:
        original, layer_class, note = self.instancecheck, self.layer_class, self.note

        def instancecheck(cls: type, instance: Any) -> bool:
            found = original(cls, instance)
            if (
                not found
                and is_peft_name(cls.__module__ or "")
                and isinstance(instance, layer_class)
                and called_from_tests(1)
            ):
                note(f"looks for PEFT's {cls.__name__} among tilpass's layers (isinstance)")
            return found

        abc.ABCMeta.__instancecheck__ = instancecheck  # type: ignore[method-assign]
        layer_getattr = self.layer_getattr

        def getattr_noted(layer: Any, name: str) -> Any:
            try:
                return layer_getattr(layer, name)
            except AttributeError:
                private = name.startswith("_") and not name.startswith("__")
                if private and called_from_tests(1):
                    note(f"reads PEFT's private layer attribute {name}")
                raise

        layer_class.__getattr__ = getattr_noted

    def uninstall(self) -> None:
        abc.ABCMeta.__instancecheck__ = self.instancecheck  # type: ignore[method-assign]
        self.layer_class.__getattr__ = self.layer_getattr
