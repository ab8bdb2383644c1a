"""Helpers shared by tilpass's config dataclasses: documented fields and number coercion.

Every config field carries a one-line ``help`` (shown by ``tilpass train --help``), and the
numbers in a YAML file or a ``--key value`` override may arrive as text: YAML 1.1 reads
``1e-3`` as a string. One coercion turns such text into the field's number type, with one
error message, wherever a config is built.
"""

from __future__ import annotations

import dataclasses
from typing import Any

_NUMBER_KINDS = ("int", "float")


def opt(default: Any, help: str) -> Any:
    """A dataclass field with a default and the ``help`` text shown by the CLI.

    A mutable default (list, dict, set) becomes a factory, so instances never share it.
    """
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(
            default_factory=lambda: type(default)(default), metadata={"help": help}
        )
    return dataclasses.field(default=default, metadata={"help": help})


def coerce_number(value: Any, kind: str | type, where: str) -> Any:
    """Turn text into the number type ``kind`` (``int``/``float``); other values pass through.

    An ``int`` given for a ``float`` field becomes a float. A whole number written as a float
    (``"1e3"``) is accepted for an ``int`` field; ``"1.5"`` is not.

    Args:
        value: The value as read from YAML or the command line.
        kind: The field's annotation: ``int``/``float`` or their names (as written in a
            dataclass with postponed annotations). Anything else leaves ``value`` unchanged.
        where: Names the field in the error, e.g. ``"config.yaml: training: max_steps"``.

    Raises:
        ValueError: ``value`` is text that is not a number of that kind.
    """
    name = kind if isinstance(kind, str) else getattr(kind, "__name__", "")
    if name not in _NUMBER_KINDS:
        return value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"{where}: expected {name}, got {value!r}") from None
        if name == "float":
            return number
        if not number.is_integer():
            raise ValueError(f"{where}: expected int (a whole number), got {value!r}")
        return int(number)
    if name == "float" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def coerce_fields(obj: Any, prefix: str = "") -> None:
    """Apply :func:`coerce_number` to every ``int``/``float`` field of a dataclass instance.

    Meant for ``__post_init__``: a config built from text gets its numbers typed in place.
    Error messages name the field as ``prefix + name``.
    """
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        coerced = coerce_number(value, f.type, prefix + f.name)
        if coerced is not value:
            setattr(obj, f.name, coerced)
