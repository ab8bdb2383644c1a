"""The `tilpass train` config: its sections, how YAML and flags become one, and its checks.

`RunConfig` is the whole of a `tilpass train` YAML file: the model, the method and its
settings, the data, the loop's hyper-parameters and the output directory. Each registered
method (`tilpass.methods.METHODS`) has a section named after it (`lora:`) whose keys are the
fields of its config class, with that class's defaults. Only the run's method's section is
read, so a section for another method is an error rather than settings silently ignored;
`method: full` trains every parameter instead (the baseline) and has no section.
`build_config` checks every setting's type, range and choice, naming where it came from.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tilpass.adapter_files import atomic_write_bytes
from tilpass.config import AdapterConfig
from tilpass.config_fields import FieldError, coerce, opt
from tilpass.config_yaml import ConfigSources
from tilpass.data.sources import FORMATS
from tilpass.errors import TilpassError
from tilpass.methods import METHODS, method_named, method_of
from tilpass.pretrained import DEFAULT_MODEL
from tilpass.quantize import QUANT_TYPES
from tilpass.train_config import TrainConfig

FULL = "full"
"""The `method` that trains every parameter of the model: the baseline, not an adapter."""

FULL_METHOD_NAME = "full fine-tuning"
"""How records and cards name `method: full`."""

BOOKKEEPING = frozenset(f.name for f in dataclasses.fields(AdapterConfig))
"""Fields every adapter config has that the run fills in itself (not settable in YAML)."""

DEFAULT_METHOD = next(iter(METHODS))
"""The first registered method: what a run uses when its config names none."""


class RunConfigError(TilpassError, ValueError):
    """A `tilpass train` config (file or command line) that cannot describe a run."""


@dataclass
class DataSection:
    """Where the examples come from and how they become tokens."""

    train: str = opt("", "Training file (JSONL/JSON/CSV/Parquet) or load_from_disk directory.")
    eval: str = opt("", "Held-out file for loss and exact-match evaluation (optional).")
    format: str | None = opt(None, "chat | prompt_completion | alpaca | text (default: detect).")
    max_length: int = opt(512, "Truncate examples to this many tokens (counted in the log).")
    train_on_prompt: bool = opt(False, "Put loss on prompt tokens too (default: answers only).")
    skip_bad_rows: bool = opt(False, "Skip and count malformed rows instead of stopping.")
    packing: bool = opt(
        False, "Pack each step's examples into rows of max_length tokens (same result, faster)."
    )
    group_by_length: bool = opt(False, "Batch examples of similar length together (seeded).")

    def validate(self) -> None:
        """Raise `FieldError` naming the first invalid field (paths are checked before a run)."""
        if self.format is not None and self.format not in FORMATS:
            raise FieldError(
                "format",
                f"format must be one of {', '.join(FORMATS)} (or unset), got {self.format!r}",
            )
        if self.max_length < 1:
            raise FieldError("max_length", f"max_length must be >= 1, got {self.max_length}")


@dataclass
class RunConfig:
    """One training run, as written in a `tilpass train` YAML file.

    `adapter` is the chosen method's config object, built from its section (`lora:`); it is
    None for `method: full`. Left out, it is the method's config with its own defaults.
    """

    model: str = opt(DEFAULT_MODEL, "Default model name or a local Hugging Face directory.")
    method: str = opt(
        DEFAULT_METHOD,
        f"{' | '.join(METHODS)} | {FULL} (every parameter trained: the baseline).",
    )
    output_dir: str = opt(
        "runs/tilpass", "Receives adapter/ (model/ for full), checkpoints, metrics and plot."
    )
    task: str = opt("", "One line saying what the run trains for (goes in the model card).")
    eval_before: bool = opt(True, "Evaluate the base model first, for the before/after table.")
    quantize: str | None = opt(
        None, "nf4 | fp4 | int8: load the base quantized (QLoRA with nf4; needs bitsandbytes)."
    )
    data: DataSection = field(default_factory=DataSection)
    training: TrainConfig = field(default_factory=TrainConfig)
    adapter: AdapterConfig | None = None

    def __post_init__(self) -> None:
        if self.quantize is not None:
            check_quantize(self.quantize, self.method, "quantize")
        if self.method == FULL:
            if self.adapter is not None:
                raise RunConfigError(f"method {FULL!r} trains no adapter, but one was given")
            return
        method = method_named(self.method)
        if self.adapter is None:
            self.adapter = method.config_class()
        elif method_of(self.adapter) is not method:
            raise RunConfigError(
                f"method {self.method!r} needs a {method.config_class.__name__}, "
                f"got a {type(self.adapter).__name__}"
            )

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain data, in the YAML layout `build_config` reads."""
        out: dict[str, Any] = {name: getattr(self, name) for name in _SCALAR_KEYS}
        if self.adapter is not None:
            saved = self.adapter.to_dict()
            out[self.method] = {f.name: saved[f.name] for f in method_fields(type(self.adapter))}
        out["data"] = dataclasses.asdict(self.data)
        out["training"] = dataclasses.asdict(self.training)
        return out


_SECTIONS: dict[str, type] = {"data": DataSection, "training": TrainConfig}
_SCALAR_KEYS = ("model", "method", "output_dir", "task", "eval_before", "quantize")


def check_quantize(quantize: str, method: str, where: str) -> None:
    """A quantized base needs an adapter to train, and a format bitsandbytes offers."""
    if quantize not in QUANT_TYPES:
        raise RunConfigError(
            f"{where}: unknown format {quantize!r}; choose one of {', '.join(QUANT_TYPES)}"
        )
    if method == FULL:
        raise RunConfigError(
            f"{where}: {quantize} cannot be combined with method: {FULL}: quantized weights are "
            "frozen and cannot be trained. Train an adapter over the quantized base (method: "
            "lora, i.e. QLoRA), or drop quantize for full fine-tuning."
        )


def method_fields(config_class: type[AdapterConfig]) -> list[dataclasses.Field[Any]]:
    """The fields of a method's config a YAML section sets (the bookkeeping ones and those
    marked `runtime`, settings for one process that are never saved, left out)."""
    return [
        f
        for f in dataclasses.fields(config_class)
        if f.name not in BOOKKEEPING and not f.metadata.get("runtime")
    ]


def field_default(f: dataclasses.Field[Any]) -> Any:
    """A dataclass field's default value (a fresh one for `default_factory` fields)."""
    return f.default_factory() if callable(f.default_factory) else f.default


def changed_settings(config: AdapterConfig) -> dict[str, Any]:
    """The settings of an adapter config that differ from its class's defaults."""
    saved = config.to_dict()
    return {
        f.name: saved[f.name]
        for f in method_fields(type(config))
        if saved[f.name] != json.loads(json.dumps(field_default(f)))
    }


def _annotation(f: dataclasses.Field[Any]) -> str:
    if isinstance(f.type, str):
        return f.type
    return f.type.__name__ if isinstance(f.type, type) else str(f.type)


def build_config(values: dict[str, Any], source: str | ConfigSources = "config") -> RunConfig:
    """A `RunConfig` from nested dicts, with every setting's type, range and choice checked.

    Unknown keys, values of the wrong type and values a section rejects (`r: 0`,
    `lr_scheduler: cosin`) raise `RunConfigError` naming where the setting came from (the
    file and line, or the command-line flag; `source` is a `ConfigSources` or one label for
    everything), the section and the key. Paths and target modules are checked by
    `tilpass.run_checks.check_run`, still before any model or data is loaded.
    """
    sources = source if isinstance(source, ConfigSources) else ConfigSources.of(source)
    if not isinstance(values, dict):
        raise RunConfigError(f"{sources.default}: expected a mapping, got {type(values).__name__}")
    method = _chosen_method(values, sources)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(RunConfig):
        if f.name in _SECTIONS and f.name in values:
            kwargs[f.name] = _build_section(_SECTIONS[f.name], values[f.name], sources, f.name)
        elif f.name in _SCALAR_KEYS and f.name in values:
            where = f"{sources.origin(f.name)}: {f.name}"
            kwargs[f.name] = coerce(values[f.name], _annotation(f), where)
    kwargs["method"] = method
    if method != FULL:
        kwargs["adapter"] = _build_section(
            method_named(method).config_class, values.get(method), sources, method
        )
    if kwargs.get("quantize") is not None:
        check_quantize(kwargs["quantize"], method, f"{sources.origin('quantize')}: quantize")
    config = RunConfig(**kwargs)
    for name, section in (("training", config.training), ("data", config.data)):
        try:
            section.validate()
        except FieldError as exc:
            raise RunConfigError(f"{sources.origin(name, exc.key)}: {name}: {exc}") from exc
    return config


def _chosen_method(values: dict[str, Any], sources: ConfigSources) -> str:
    """The run's method; unknown top-level keys and other methods' sections are errors."""
    valid = [*_SCALAR_KEYS, *_SECTIONS, *METHODS]
    unknown = sorted(set(values) - set(valid), key=str)
    if unknown:
        raise RunConfigError(
            f"{sources.origin(unknown[0])}: unknown key(s) {', '.join(unknown)}; valid keys: "
            f"{', '.join(valid)} (tilpass train --help lists them)"
        )
    where = sources.origin("method")
    method = coerce(values.get("method", DEFAULT_METHOD), "str", f"{where}: method")
    choices = [*METHODS, FULL]
    if method not in choices:
        raise RunConfigError(
            f"{where}: method: unknown method {method!r}; choose one of {', '.join(choices)}"
        )
    others = [name for name in METHODS if name in values and name != method]
    if others:
        raise RunConfigError(
            f"{sources.origin(others[0])}: section '{others[0]}' is for method {others[0]}, but "
            f"the run's method is {method}; remove the section or set method: {others[0]}"
        )
    return method


def _build_section(cls: type, values: Any, sources: ConfigSources, section: str) -> Any:
    """One section's dataclass from its mapping; the config class's own checks run here."""
    values = {} if values is None else values
    if not isinstance(values, dict):
        where = sources.origin(section)
        raise RunConfigError(f"{where}: {section}: expected a mapping of keys, got {values!r}")
    fields = method_fields(cls) if issubclass(cls, AdapterConfig) else dataclasses.fields(cls)
    by_name = {f.name: f for f in fields if f.name not in BOOKKEEPING}
    unknown = sorted(set(values) - set(by_name), key=str)
    if unknown:
        where = sources.origin(section, str(unknown[0]))
        raise RunConfigError(
            f"{where}: {section}: unknown key(s) {', '.join(map(str, unknown))}; valid keys: "
            f"{', '.join(sorted(by_name))} (tilpass train --help lists them)"
        )
    kwargs = {
        name: coerce(
            value, _annotation(by_name[name]), f"{sources.origin(section, name)}: {section}: {name}"
        )
        for name, value in values.items()
    }
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, NotImplementedError) as exc:
        key = _named_key(str(exc), by_name) or (next(iter(values), "") if values else "")
        where = sources.origin(section, key) if key else sources.origin(section)
        raise RunConfigError(f"{where}: {section}: {exc}") from exc


def _named_key(message: str, names: dict[str, Any]) -> str | None:
    """The field a config class's error message starts with (`"r must be ..."` -> `r`)."""
    found = re.match(r"[A-Za-z_]\w*", message)
    return found.group(0) if found and found.group(0) in names else None


def documented_attributes(cls: type) -> dict[str, str]:
    """Field descriptions from a Google-style docstring's `Attributes:` block.

    `a / b: text` describes both fields; indented lines continue the description above them.
    """
    out: dict[str, str] = {}
    lines = (cls.__doc__ or "").expandtabs().splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == "Attributes:"]
    names: list[str] = []
    for line in lines[starts[0] + 1 :] if starts else []:
        text = line.strip()
        head, colon, rest = text.partition(":")
        keys = [k.strip() for k in head.split("/")]
        if colon and all(k.isidentifier() for k in keys):
            names = keys
            out.update(dict.fromkeys(names, rest.strip()))
        elif text and names:
            out.update({n: f"{out[n]} {text}" for n in names})
        elif not text:
            break
    return out


def help_sections() -> list[tuple[str, list[tuple[str, Any, str]]]]:
    """`tilpass train --help`'s blocks: (title, [(dotted key, default, help)]) per section.

    A field's help is its `help` metadata, else its line in the class's `Attributes:` block.
    """

    def rows(cls: type, fields: list[dataclasses.Field[Any]], prefix: str) -> list[Any]:
        documented = documented_attributes(cls)
        return [
            (
                prefix + f.name,
                field_default(f),
                f.metadata.get("help") or documented.get(f.name, ""),
            )
            for f in fields
        ]

    top = [f for f in dataclasses.fields(RunConfig) if f.name in _SCALAR_KEYS]
    blocks = [("run (top level)", rows(RunConfig, top, ""))]
    for name, cls in _SECTIONS.items():
        blocks.append((name, rows(cls, list(dataclasses.fields(cls)), f"{name}.")))
    for method in METHODS.values():
        config_class = method.config_class
        title = f"{method.name} (used when method: {method.name}): {method.description}"
        blocks.append((title, rows(config_class, method_fields(config_class), f"{method.name}.")))
    return blocks


def save_config(config: RunConfig, path: Path) -> None:
    """Write the resolved config as YAML, atomically."""
    atomic_write_bytes(path, yaml.safe_dump(config.to_dict(), sort_keys=False).encode())
