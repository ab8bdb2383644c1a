"""Adapter configs: a dataclass per method, round-tripped through PEFT's `adapter_config.json`.

Field names are PEFT's, so a file written by either library reads in the other without a
translation table. Unknown fields in a file are warned about and ignored, as PEFT does, so a
file from a newer PEFT still loads.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import warnings
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from tilpass.config_fields import opt
from tilpass.errors import AdapterFileError, ConfigKeysError

CONFIG_NAME = "adapter_config.json"
# Bookkeeping PEFT writes into every file; it changes nothing about the adapter.
PEFT_METADATA = frozenset({"auto_mapping", "peft_version", "megatron_core"})
PEFT_FORMAT_VERSION = "0.21.2"
"""The PEFT release whose file layout tilpass writes (a new config's `peft_version`)."""


class PeftType(str, enum.Enum):
    """PEFT's method names as its files write them (`"peft_type": "LORA"`); a config's
    `peft_type` is one of these, and compares equal to the plain string too."""

    __str__ = str.__str__  # "LORA", not "PeftType.LORA", in messages

    PROMPT_TUNING = "PROMPT_TUNING"
    MULTITASK_PROMPT_TUNING = "MULTITASK_PROMPT_TUNING"
    P_TUNING = "P_TUNING"
    PREFIX_TUNING = "PREFIX_TUNING"
    LORA = "LORA"
    ADALORA = "ADALORA"
    BOFT = "BOFT"
    ADAPTION_PROMPT = "ADAPTION_PROMPT"
    IA3 = "IA3"
    LOHA = "LOHA"
    LOKR = "LOKR"
    OFT = "OFT"
    POLY = "POLY"
    LN_TUNING = "LN_TUNING"
    VERA = "VERA"
    FOURIERFT = "FOURIERFT"
    XLORA = "XLORA"
    HRA = "HRA"
    VBLORA = "VBLORA"
    CPT = "CPT"
    BONE = "BONE"
    MISS = "MISS"
    RANDLORA = "RANDLORA"
    ROAD = "ROAD"
    TRAINABLE_TOKENS = "TRAINABLE_TOKENS"
    SHIRA = "SHIRA"
    C3A = "C3A"
    WAVEFT = "WAVEFT"
    OSF = "OSF"
    DELORA = "DELORA"


TASK_TYPES = (
    "SEQ_CLS",
    "SEQ_2_SEQ_LM",
    "CAUSAL_LM",
    "TOKEN_CLS",
    "QUESTION_ANS",
    "FEATURE_EXTRACTION",
)
"""PEFT's task types (`TaskType`); a config's `task_type` is one of them or None."""

C = TypeVar("C", bound="AdapterConfig")

BOOKKEEPING_FIELDS = (
    "task_type",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "peft_version",
)
"""Fields every config has that describe the file, not the method (not CLI settings)."""


@dataclasses.dataclass
class AdapterConfig:
    """Fields every method shares; a method's config subclasses this and sets `PEFT_TYPE`."""

    PEFT_TYPE: ClassVar[str] = ""

    task_type: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    peft_version: str | None = None
    peft_type: PeftType | str | None = dataclasses.field(default=None, repr=False)
    """The method's name as PEFT writes it (`PeftType.LORA`, equal to `"LORA"`); set from the
    class, as PEFT does: a value passed in (PEFT's own files and tests pass one) is replaced."""

    def __post_init__(self) -> None:
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise ValueError(
                f"Invalid task type: {self.task_type!r}. Must be one of the following task "
                f"types: {', '.join(TASK_TYPES)} (or None for a plain model)."
            )
        if self.peft_version is None:
            self.peft_version = PEFT_FORMAT_VERSION
        try:
            self.peft_type = PeftType(self.PEFT_TYPE)
        except ValueError:  # a method PEFT does not have
            self.peft_type = self.PEFT_TYPE

    @property
    def is_prompt_learning(self) -> bool:
        """PEFT's flag for methods that add virtual tokens to the inputs (prompt tuning)."""
        return self.PEFT_TYPE == PeftType.PROMPT_TUNING

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict, with `peft_type` added as PEFT writes it."""
        out = {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}
        out["peft_type"] = self.PEFT_TYPE
        return out

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any], source: str = "config") -> C:
        """Build from a dict; unknown keys warn and are dropped (PEFT's behaviour)."""
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in data.items() if k in names}
        unknown = sorted(k for k in data if k not in names)
        # PEFT writes many fields for features tilpass lacks; they are only worth a warning when
        # set to something other than their "off" value.
        active = [
            k
            for k in unknown
            if k not in PEFT_METADATA and data[k] not in (None, False, {}, [], "", 16)
        ]
        if active:
            warnings.warn(
                f"Unexpected keyword arguments {active} for class {cls.__name__}, these are "
                f"ignored. {source}: tilpass does not know these fields; a file from a newer "
                "PEFT may use features tilpass lacks.",
                stacklevel=2,
            )
        try:
            return cls(**known)
        except (TypeError, ValueError) as exc:
            raise AdapterFileError(f"{source}: {exc}") from exc

    def layer_spec(self, module_name: str, initialize: bool) -> Any:
        """The settings of this adapter for the layer at `module_name` (method-specific).

        `initialize=False` means the adapter's tensors are about to be loaded from a file, so
        the layer only allocates them.
        """
        raise NotImplementedError(f"{type(self).__name__} does not define layer_spec")

    def describe_layers(self, layers: list[Any]) -> None:
        """Record what the injected layers found (e.g. GPT-2's transposed layout)."""

    @property
    def changes_base_weights(self) -> bool:
        """Whether adding this adapter rewrites base weights (LoRA's PiSSA / OLoRA), which
        every other adapter of the model shares; most methods leave them alone."""
        return False

    def converted_for_initial_model(
        self, tensors: dict[str, Any], initial: Path
    ) -> tuple[AdapterConfig, dict[str, Any]]:
        """This adapter as one for the base model before its initialisation changed the base
        weights (PEFT's `path_initial_model_for_weight_conversion`); only methods whose
        initialisation changes the base weights (LoRA's PiSSA / OLoRA) can convert."""
        raise ValueError(
            "Passing `path_initial_model_for_weight_conversion` to `save_pretrained` is not "
            f"supported for {type(self).__name__}: it converts LoRA adapters initialised with "
            "PiSSA or OLoRA. Save without it."
        )

    def check_new_adapter(self, existing: dict[str, Any]) -> None:
        """Raise if this config cannot join a model that holds the `existing` adapters (name ->
        config), before anything is injected; most methods have no such rule."""

    def extra_layers(self, model: Any, initialize: bool) -> list[tuple[str, Any, Any]]:
        """Modules this adapter wraps besides its targets, as (name as written, layer factory,
        the layer's settings); e.g. LoRA's `trainable_token_indices`. Most methods have none."""
        return []

    def save(self, directory: str | Path) -> Path:
        """Write `adapter_config.json` atomically into `directory`."""
        from tilpass.adapter_files import atomic_write_bytes

        if Path(directory).is_file():
            raise ValueError(f"{directory} is a file; save_pretrained takes a directory")
        path = Path(directory) / CONFIG_NAME
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"
        atomic_write_bytes(path, text.encode())
        return path

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> None:
        """PEFT's name for `save`: write `adapter_config.json` into `save_directory`."""
        self.save(save_directory)

    @classmethod
    def from_json_file(cls, path_json_file: str | Path, **kwargs: Any) -> dict[str, Any]:
        """The plain dict in a config file (PEFT's classmethod); a `runtime_config` entry, which
        PEFT never saves but which may have been written by hand, is dropped with a warning."""
        path = Path(path_json_file)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise AdapterFileError(f"{path}: no such config file") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise AdapterFileError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise AdapterFileError(f"{path}: expected a JSON object, found {type(data).__name__}")
        return _without_runtime_config(data, path)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | Path, subfolder: str | None = None, **kwargs: Any
    ) -> AdapterConfig:
        """Read `adapter_config.json` from a local directory (or its `subfolder`).

        On a method's class the file must be that method's; on `AdapterConfig` itself the
        file's `peft_type` picks the class, as `PeftConfig.from_pretrained` does.
        """
        directory = Path(pretrained_model_name_or_path)
        if subfolder:
            directory = directory / subfolder
        data = read_config_dict(directory, cls.__name__ if cls.PEFT_TYPE else "PeftConfig")
        source = str(directory / CONFIG_NAME)
        from tilpass.methods import UnknownMethodError, method_for_peft_type

        try:
            found = method_for_peft_type(str(data["peft_type"])).config_class
        except UnknownMethodError as exc:
            raise AdapterFileError(f"{source}: {exc}") from None
        if cls.PEFT_TYPE and found is not cls:
            raise AdapterFileError(
                f"{source}: peft_type is {data['peft_type']!r}, not {cls.PEFT_TYPE!r}; load it "
                f"with {found.__name__}.from_pretrained"
            )
        return found.from_dict({**data, **kwargs}, source=source)


PeftConfig = AdapterConfig
"""PEFT's name for the base config (`PeftConfig.from_pretrained` picks the method's class)."""


@dataclasses.dataclass
class TargetedConfig(AdapterConfig):
    """A config whose method wraps modules chosen by name (PEFT's targeting fields)."""

    target_modules: list[str] | str | None = opt(
        None, "Module names (exact or dotted suffix), a regex, or 'all-linear'."
    )
    exclude_modules: list[str] | str | None = opt(
        None, "Names or regex to leave out, matched like target_modules."
    )
    modules_to_save: list[str] | None = opt(
        None, "Whole modules trained and saved with the adapter (e.g. [lm_head])."
    )
    fan_in_fan_out: bool = opt(False, "Weights stored (in, out), as GPT-2's Conv1D (detected).")

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.modules_to_save, (set, tuple)):
            self.modules_to_save = list(self.modules_to_save)
        self._check_layers()

    def _check_layers(self) -> None:
        """PEFT's checks of `layers_to_transform` / `layers_pattern` (for methods with them)."""
        layers = getattr(self, "layers_to_transform", None)
        pattern = getattr(self, "layers_pattern", None)
        regex = isinstance(self.target_modules, str) and self.target_modules != "all-linear"
        for name, value in (("layers_to_transform", layers), ("layers_pattern", pattern)):
            if regex and value is not None:
                raise ValueError(
                    f"`{name}` cannot be used when `target_modules` is a str. A str is a regex: "
                    "write the layer indices into it, or list the module names instead"
                )
        if pattern and layers is None:
            raise ValueError(
                "When `layers_pattern` is specified, `layers_to_transform` must also be "
                "specified (the indices of the layers to adapt)"
            )

    def describe_layers(self, layers: list[Any]) -> None:
        if any(getattr(layer, "transposed", False) for layer in layers):
            self.fan_in_fan_out = True  # GPT-2's Conv1D layout, as PEFT records it


def _jsonable(value: Any) -> Any:
    if isinstance(value, (set, tuple)):
        return sorted(value) if isinstance(value, set) else list(value)
    return value


def _without_runtime_config(data: dict[str, Any], path: Path) -> dict[str, Any]:
    """`data` without a `runtime_config` entry, which PEFT never saves but which may have been
    written by hand: warned about and dropped, as PEFT does."""
    if "runtime_config" in data:
        warnings.warn(
            f"{path}: The configuration file contains a `runtime_config` key. This is "
            "ignored. Runtime configurations are only valid at runtime.",
            stacklevel=3,
        )
        del data["runtime_config"]
    return data


def read_config_dict(directory: str | Path, reader: str = "adapter") -> dict[str, Any]:
    """Read and minimally validate `adapter_config.json` in `directory`; `reader` names the
    config class asking, for the message about a file without `peft_type`."""
    path = Path(directory) / CONFIG_NAME
    if not Path(directory).is_dir():
        raise AdapterFileError(f"{directory}: no such adapter directory")
    if not path.is_file():
        raise AdapterFileError(
            f"{path}: missing, so {directory} is not an adapter directory. An adapter "
            "directory holds adapter_config.json and adapter_model.safetensors (the PEFT "
            "layout), as `tilpass train` and save_pretrained (tilpass's or PEFT's) write it"
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterFileError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise AdapterFileError(f"{path}: expected a JSON object, found {type(data).__name__}")
    if "peft_type" not in data:
        raise ConfigKeysError(
            f"{path}: The {reader} config that is trying to be loaded is missing required keys: "
            f'{{\'peft_type\'}}. An adapter config names its method, e.g. "peft_type": "LORA"; '
            f"is {directory} an adapter directory?"
        )
    return _without_runtime_config(data, path)
