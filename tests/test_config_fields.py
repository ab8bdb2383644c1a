"""Config field helpers: help text on fields, and numbers that YAML or the CLI give as text."""

from __future__ import annotations

from dataclasses import dataclass, fields

import pytest

from tilpass.config_fields import coerce_fields, coerce_number, opt


def test_coerce_number() -> None:
    assert coerce_number("1e-3", "float", "lr") == 1e-3
    assert coerce_number("1e3", "int", "steps") == 1000
    assert type(coerce_number("7", int, "steps")) is int
    assert type(coerce_number(2, "float", "epochs")) is float
    assert coerce_number(True, "float", "flag") is True  # a bool is not promoted
    assert coerce_number("cosine", "str", "kind") == "cosine"
    with pytest.raises(ValueError, match="training: max_steps: expected int, got 'many'"):
        coerce_number("many", "int", "training: max_steps")
    with pytest.raises(ValueError, match=r"steps: expected int \(a whole number\), got '1.5'"):
        coerce_number("1.5", "int", "steps")


@dataclass
class _Section:
    rate: float = opt(0.1, "A rate.")
    count: int = opt(3, "A count.")
    name: str = opt("x", "A name.")

    def __post_init__(self) -> None:
        coerce_fields(self, "section: ")


def test_fields_carry_help_and_are_coerced_in_place() -> None:
    assert [f.metadata["help"] for f in fields(_Section)] == ["A rate.", "A count.", "A name."]
    section = _Section(rate="2e-1", count="4", name="5")  # type: ignore[arg-type]
    assert (section.rate, section.count, section.name) == (0.2, 4, "5")
    assert type(section.count) is int
    with pytest.raises(ValueError, match="section: rate: expected float, got 'fast'"):
        _Section(rate="fast")  # type: ignore[arg-type]
