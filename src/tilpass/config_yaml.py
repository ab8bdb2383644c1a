"""Run configs as YAML: strict parsing, and where each setting came from.

`load_config_file` reads a `tilpass train` YAML file: a syntax error names the file, line and
column; a key given twice in one mapping (a section written twice, say) is an error instead of
the first one silently vanishing. `parse_value` reads one `--section.key value` override the
same way. `ConfigSources` remembers which keys came from the file (and on which line) and
which from the command line, so that an error blames the right one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tilpass.errors import TilpassError

KeyPath = tuple[str, ...]


class ConfigFileError(TilpassError, ValueError):
    """A config file or command-line value that is not valid YAML for a run config."""


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, with duplicate keys in a mapping refused."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    out: dict[Any, Any] = {}
    first_line: dict[Any, int] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in first_line
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, f"a key must be a plain value, got {key!r}", key_node.start_mark
            ) from None
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"key {key!r} appears twice in one mapping (first on line {first_line[key]}); "
                "merge the two into one",
                key_node.start_mark,
            )
        first_line[key] = key_node.start_mark.line + 1
        out[key] = loader.construct_object(value_node, deep=deep)
    return out


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,  # type: ignore[arg-type]
)


def _key_lines(node: yaml.Node | None, prefix: KeyPath = ()) -> dict[KeyPath, int]:
    """Line (1-based) of every key of nested mappings, by its path of keys."""
    lines: dict[KeyPath, int] = {}
    if not isinstance(node, yaml.MappingNode):
        return lines
    for key_node, value_node in node.value:
        if isinstance(key_node, yaml.ScalarNode):
            path = (*prefix, str(key_node.value))
            lines[path] = key_node.start_mark.line + 1
            lines.update(_key_lines(value_node, path))
    return lines


def _parse(text: str, where: str) -> tuple[Any, dict[KeyPath, int]]:
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        value = loader.construct_document(node) if node is not None else None
        return value, _key_lines(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        at = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = " ".join(filter(None, [exc.context, exc.problem]))
        raise ConfigFileError(f"{where}{at}: invalid YAML: {problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigFileError(f"{where}: invalid YAML: {exc}") from None
    finally:
        loader.dispose()


def load_config_file(path: str | Path) -> tuple[dict[str, Any], dict[KeyPath, int]]:
    """A YAML config file's top-level mapping and the line of each key in it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigFileError(f"{path}: no such config file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigFileError(f"{path}: not a UTF-8 text file ({exc.reason})") from None
    values, lines = _parse(text, str(path))
    if values is None:
        return {}, {}
    if not isinstance(values, dict):
        raise ConfigFileError(
            f"{path}: expected a YAML mapping of keys at the top level, got {type(values).__name__}"
        )
    return values, lines


def parse_value(text: str, flag: str) -> Any:
    """One command-line value, read as YAML (`16`, `false`, `[q_proj, v_proj]`)."""
    if text == "":
        return ""
    return _parse(text, f"command line {flag}")[0]


@dataclass
class ConfigSources:
    """Where each setting of a run config came from, for error messages.

    Attributes:
        file: the YAML file, or None when everything came from the command line.
        lines: the line of each key path in the file.
        overrides: the key paths given on the command line (they win over the file).
        default: how to name the origin of a setting neither of them holds.
    """

    file: str | None = None
    lines: dict[KeyPath, int] = field(default_factory=dict)
    overrides: set[KeyPath] = field(default_factory=set)
    default: str = "command line"

    @classmethod
    def of(cls, label: str) -> ConfigSources:
        """Sources that name every setting by one label (`"quickstart"`, a file name)."""
        return cls(default=label)

    def origin(self, *path: str) -> str:
        """The file and line, or the command-line flag, that set the key at `path`."""
        for depth in range(len(path), 0, -1):  # a flag may set a whole section or mapping
            if path[:depth] in self.overrides:
                return f"command line (--{'.'.join(path[:depth])})"
        if self.file is not None:
            for depth in range(len(path), 0, -1):
                if path[:depth] in self.lines:
                    return f"{self.file}, line {self.lines[path[:depth]]}"
            return self.file
        return self.default


def read_overrides(items: list[str]) -> tuple[dict[str, Any], set[KeyPath]]:
    """`--a.b value` / `--a.b=value` pairs into a nested dict, and the key path of each flag.

    Values are read as YAML (`parse_value`); dashes in keys become underscores.
    """
    out: dict[str, Any] = {}
    paths: set[KeyPath] = set()
    i = 0
    while i < len(items):
        item = items[i]
        if not item.startswith("--") or len(item) == 2:
            raise ConfigFileError(f"expected --key.sub value, got {item!r}")
        key, eq, value = item[2:].partition("=")
        if not eq:
            if i + 1 >= len(items) or items[i + 1].startswith("--"):
                raise ConfigFileError(f"--{key} needs a value (e.g. --{key} 16)")
            value = items[i + 1]
            i += 1
        i += 1
        parts = key.replace("-", "_").split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigFileError(f"--{key}: {part} is a value, not a section")
        node[parts[-1]] = parse_value(value, f"--{key}")
        paths.add(tuple(parts))
    return out, paths
