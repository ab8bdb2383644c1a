"""Fields of the config dataclasses that YAML files and `--section.key` overrides fill in.

`opt` declares a field with the help text `tilpass train --help` prints; `coerce` turns what
YAML hands over into the field's type, or says which key held what instead.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import field
from typing import Any

_NUMBERS = ("int", "float")
# Strings that YAML 1.1 reads as booleans when unquoted; quoted, they are a mistake for a
# boolean field (and truthy if taken as a string).
_BOOL_WORDS = frozenset({"true", "false", "yes", "no", "on", "off", "y", "n"})


class FieldError(ValueError):
    """An invalid value of one config field; `key` names it so the caller can say where."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def opt(default: Any, help: str) -> Any:
    """A dataclass field with `default` and a help line (mutable defaults are copied per use)."""
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def coerce(value: Any, annotation: str, where: str) -> Any:
    """`value` as a field annotated `annotation` wants it; a clear error naming `where` if not.

    YAML 1.1 reads `1e-3` as a string and `--key value` overrides may arrive as text, so strings
    become numbers for number fields, and ints become floats for float fields. The result is then
    checked against the annotation's types (`list[str] | str | None` and the like); a type
    this does not know (a class, `Any`) accepts everything and leaves the check to the config.
    """
    members = _union_members(annotation)
    names = {m.partition("[")[0] for m in members}
    if isinstance(value, str) and "str" not in names and names & set(_NUMBERS):
        value = _number(value, "int" in names and "float" not in names, annotation, where)
    if "float" in names and "int" not in names and _is_int(value):
        value = float(value)
    if "bool" in names and isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
        raise ValueError(
            f"{where}: expected {annotation}, got {value!r}: a quoted string, not a boolean; "
            f"write {value.strip().lower()} without quotes"
        )
    if not any(_fits(value, member) for member in members):
        raise ValueError(f"{where}: expected {annotation}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value) and names & set(_NUMBERS):
        raise ValueError(f"{where}: expected a finite number, got {value!r}")
    return value


def coerce_number(value: Any, kind: str | type, where: str) -> Any:
    """Text as the number type `kind` (`int` / `float` or their names); others pass through.

    An int given for a float field becomes a float; `"1e3"` is accepted for an int field,
    `"1.5"` is not.
    """
    name = kind if isinstance(kind, str) else getattr(kind, "__name__", "")
    if name not in _NUMBERS:
        return value
    if isinstance(value, str):
        return _number(value, name == "int", name, where)
    if name == "float" and _is_int(value):
        return float(value)
    return value


def coerce_fields(obj: Any, prefix: str = "") -> None:
    """Apply `coerce_number` to every int / float field of a dataclass instance in place
    (for `__post_init__`: a config built from text gets its numbers typed)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        coerced = coerce_number(value, f.type, prefix + f.name)
        if coerced is not value:
            setattr(obj, f.name, coerced)


def _number(text: str, want_int: bool, annotation: str, where: str) -> int | float:
    try:
        number = float(text)
    except ValueError:
        raise ValueError(f"{where}: expected {annotation}, got {text!r}") from None
    if not want_int:
        return number
    if not number.is_integer():
        raise ValueError(f"{where}: expected {annotation} (a whole number), got {text!r}")
    return int(number)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _union_members(annotation: str) -> list[str]:
    """`"list[str] | str | None"` -> `["list[str]", "str", "None"]` (brackets kept whole)."""
    members, depth, current = [], 0, ""
    for char in annotation:
        if char == "|" and depth == 0:
            members.append(current.strip())
            current = ""
            continue
        depth += (char == "[") - (char == "]")
        current += char
    members.append(current.strip())
    return members


def _fits(value: Any, member: str) -> bool:
    """Whether `value` has the type `member` names; unknown names accept any value."""
    name, _, args = member.partition("[")
    args = args.removesuffix("]")
    simple = {
        "int": _is_int(value),
        "float": _is_int(value) or isinstance(value, float),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
        "None": value is None,
    }
    if name in simple:
        return simple[name]
    if name == "list":
        return isinstance(value, list) and all(_fits(item, args) for item in value)
    if name == "dict":
        key, _, item = args.partition(",")
        return isinstance(value, dict) and all(
            _fits(k, key.strip()) and _fits(v, item.strip()) for k, v in value.items()
        )
    return True
