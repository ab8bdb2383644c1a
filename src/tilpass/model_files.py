"""Saving and loading an `AdaptedModel`'s adapters in PEFT's directory layout.

`save_adapters` writes each adapter as PEFT does (`default` in the directory, others in
`dir/<name>/`): `adapter_config.json`, `adapter_model.safetensors` (or, only when asked,
PEFT's pickle file `adapter_model.bin`) and a model card `README.md`. `load_adapter_dir` reads
one back strictly: every tensor must match the model, or nothing is loaded.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from tilpass.adapter_files import (
    PICKLE_NAME,
    WEIGHTS_NAME,
    atomic_write_bytes,
    load_tensors,
    save_tensors,
)
from tilpass.adapter_state import embedding_tensors
from tilpass.card import CARD_NAME, adapter_card
from tilpass.config import AdapterConfig, read_config_dict
from tilpass.device_map import target_device
from tilpass.errors import AdapterFileError
from tilpass.inject import adapter_layers
from tilpass.methods import UnknownMethodError, method_for_peft_type

if TYPE_CHECKING:
    from tilpass.model import AdaptedModel

PREFIX = "base_model.model."  # PEFT's key prefix for a model's adapter tensors
DEFAULT = "default"
LARGE_ADAPTER_FRACTION = 0.10


def save_adapters(
    model: AdaptedModel,
    save_directory: str | Path,
    safe_serialization: bool = True,
    selected_adapters: list[str] | None = None,
    save_embedding_layers: bool | str = "auto",
    is_main_process: bool = True,
    path_initial_model_for_weight_conversion: str | Path | None = None,
    **kwargs: Any,
) -> None:
    """Write the adapters of `model` (all, or `selected_adapters`) under `save_directory`;
    with `path_initial_model_for_weight_conversion`, each converted as its config's
    `converted_for_initial_model` says (a PiSSA / OLoRA adapter as plain LoRA)."""
    unknown = sorted(k for k, v in kwargs.items() if v is not None)
    if unknown:
        raise TypeError(f"save_pretrained() got arguments tilpass does not support: {unknown}")
    if Path(save_directory).is_file():
        raise ValueError(f"Provided path ({save_directory}) should be a directory, not a file")
    names = list(model.peft_config) if selected_adapters is None else list(selected_adapters)
    unknown = [n for n in names if n not in model.peft_config]
    if unknown:
        raise ValueError(
            f"You passed an invalid `selected_adapters` arguments, current supported adapter "
            f"names are {sorted(model.peft_config)} - got {unknown}."
        )
    for name in names:
        target = Path(save_directory) if name == DEFAULT else Path(save_directory) / name
        tensors = model.adapter_state_dict(name)
        config = model.peft_config[name]
        tensors.update(embedding_tensors(model, config, save_embedding_layers, PREFIX))
        if not is_main_process:
            continue
        if path_initial_model_for_weight_conversion is not None:
            initial = Path(path_initial_model_for_weight_conversion)
            config, tensors = config.converted_for_initial_model(tensors, initial)
        _warn_if_large(model, name, tensors)
        if safe_serialization:
            save_tensors(target / WEIGHTS_NAME, tensors, metadata={"format": "pt"})
        else:
            _save_pickle(target / PICKLE_NAME, tensors)
        saved = copy.deepcopy(config)
        saved.inference_mode = True
        saved.save(target)
        if not (target / CARD_NAME).exists():
            base = getattr(getattr(model.base_model, "config", None), "_name_or_path", None)
            atomic_write_bytes(target / CARD_NAME, adapter_card(saved, base or None).encode())


def _save_pickle(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """PEFT's `safe_serialization=False` file: a plain dict of tensors in torch's format (it
    loads with `torch.load(weights_only=True)`, the only way tilpass reads it, and only when
    the caller passes `allow_pickle=True`)."""
    import io

    buffer = io.BytesIO()
    torch.save({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def _warn_if_large(model: AdaptedModel, name: str, tensors: dict[str, torch.Tensor]) -> None:
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    base = sum(p.numel() * p.element_size() for p in model.base_model.parameters()) - size
    if size <= LARGE_ADAPTER_FRACTION * max(base, 1):
        return
    per_module: dict[str, int] = {}
    for path, layer in adapter_layers(model.base_model):
        parts = layer.adapter_tensors(name).values()
        per_module[path] = sum(t.numel() * t.element_size() for t in parts)
    top = sorted(per_module.items(), key=lambda kv: -kv[1])[:5]
    warnings.warn(
        f"adapter {name!r} is {size / 2**20:.1f} MiB, {100 * size / max(base, 1):.0f}% of the "
        f"base model; the largest parts: "
        f"{', '.join(f'{m} ({b / 2**20:.1f} MiB)' for m, b in top)}. Embedding or output-head "
        "layers in target_modules / modules_to_save make adapters large; leave them out unless "
        "the task needs them.",
        stacklevel=4,
    )


def read_adapter_config(
    directory: Path, is_trainable: bool, config: AdapterConfig | None = None
) -> AdapterConfig:
    """The adapter's config: `config` if the caller gives one, else the directory's file."""
    if config is not None:
        config = copy.deepcopy(config)
    else:
        data = read_config_dict(directory)
        config_path = directory / "adapter_config.json"
        try:
            config_cls = method_for_peft_type(str(data["peft_type"])).config_class
        except UnknownMethodError as exc:
            raise AdapterFileError(f"{config_path}: {exc}") from None
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="LoRA rank")
            config = config_cls.from_dict(data, source=str(config_path))
    config.inference_mode = not is_trainable
    return config


def load_adapter_dir(
    model: AdaptedModel,
    directory: Path,
    adapter_name: str,
    config: AdapterConfig,
    options: dict[str, Any],
) -> _IncompatibleKeys:
    """Add adapter `adapter_name` to `model` and fill it from `directory`; strict unless
    `options["allow_partial"]`. On any mismatch the adapter is removed again. Returns the
    missing and unexpected keys (empty for a strict load)."""
    if not directory.is_dir():
        raise AdapterFileError(f"{directory}: no such adapter directory")
    tensors = load_tensors(directory, allow_pickle=options["allow_pickle"])
    if options["torch_device"] is not None:
        tensors = {k: v.to(options["torch_device"]) for k, v in tensors.items()}
    allow_partial = options["allow_partial"]
    # A strict load fills every tensor, so initialising them first would be wasted work; a
    # partial one keeps a proper initialisation for the keys the file lacks.
    model.add_adapter(
        adapter_name,
        config,
        low_cpu_mem_usage=not allow_partial,
        autocast_adapter_dtype=options["autocast_adapter_dtype"],
    )
    try:
        missing, unexpected = fill(model, adapter_name, tensors, directory, allow_partial)
    except Exception:
        model.delete_adapter(adapter_name)
        raise
    return _IncompatibleKeys(missing, unexpected)


def fill(
    model: AdaptedModel,
    name: str,
    tensors: dict[str, torch.Tensor],
    directory: Path,
    allow_partial: bool,
) -> tuple[list[str], list[str]]:
    """Copy `tensors` (PEFT's keys) into adapter `name`, checking every key and shape;
    returns the missing and unexpected keys."""
    expected = model.adapter_state_dict(name)
    tensors = drop_unchanged_embeddings(model, tensors, directory)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    where = directory / WEIGHTS_NAME
    for key in sorted(set(expected) & set(tensors)):
        if tuple(expected[key].shape) != tuple(tensors[key].shape):
            raise AdapterFileError(
                f"{where}: {key} has shape {tuple(tensors[key].shape)}, the model expects "
                f"{tuple(expected[key].shape)}; was the adapter trained on another base "
                "model or with another rank_pattern?"
            )
    if (missing or unexpected) and not allow_partial:
        raise AdapterFileError(
            f"{where} does not match the model: {key_report(missing, unexpected)}. "
            "Was it trained on another base model? Refusing to load part of an adapter; "
            "pass allow_partial=True to load the matching keys anyway."
        )
    if missing or unexpected:
        warnings.warn(f"{where}: partial load, {key_report(missing, unexpected)}", stacklevel=4)
    with torch.no_grad():
        for key in set(expected) & set(tensors):
            expected[key].copy_(tensors[key])
    for layer in model.adapter_layer_list():
        layer.invalidate()
    return missing, unexpected


def drop_unchanged_embeddings(
    model: AdaptedModel, tensors: dict[str, torch.Tensor], directory: Path
) -> dict[str, torch.Tensor]:
    """PEFT also saves the base embedding matrix when embeddings are adapted; accept it when
    it equals ours, refuse it otherwise (tilpass never overwrites base weights)."""
    out = {}
    for key, value in tensors.items():
        if key.startswith(PREFIX) and key.endswith(".base_layer.weight"):
            path = key[len(PREFIX) : -len(".base_layer.weight")]
            try:
                ours = model.base_model.get_submodule(path).weight
            except AttributeError:
                out[key] = value
                continue
            if ours.shape != value.shape or not torch.equal(ours.to(value.dtype), value):
                raise AdapterFileError(
                    f"{directory / WEIGHTS_NAME}: {key} carries a modified copy of the base "
                    "weight (e.g. resized embeddings); tilpass does not overwrite base "
                    "weights. Load the matching base model instead."
                )
            continue
        out[key] = value
    return out


def key_report(missing: list[str], unexpected: list[str], limit: int = 5) -> str:
    """'2 missing keys: a, b; 1 unexpected keys: c' (at most `limit` of each shown)."""
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            shown = ", ".join(keys[:limit]) + (
                f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
            )
            parts.append(f"{len(keys)} {label} keys: {shown}")
    return "; ".join(parts)


class FilesMixin:
    """`AdaptedModel`'s file API (PEFT's names): its state dict, saving and loading."""

    def adapter_state_dict(self: AdaptedModel, adapter_name: str) -> dict[str, torch.Tensor]:
        """The adapter's tensors under PEFT's keys (`base_model.model.<path>.lora_A.weight`)."""
        self.check_adapter_name(adapter_name)
        out: dict[str, torch.Tensor] = {}
        for path, layer in adapter_layers(self.base_model):
            for key, tensor in layer.adapter_tensors(adapter_name).items():
                out[key if layer.ROOT_KEYS else f"{PREFIX}{path}.{key}"] = tensor
        for key, bias in self.trained_biases(adapter_name).items():  # bias="all" / "lora_only"
            out[f"{PREFIX}{key}"] = bias
        return out

    def save_pretrained(
        self: AdaptedModel,
        save_directory: str | Path,
        safe_serialization: bool = True,
        selected_adapters: list[str] | None = None,
        save_embedding_layers: bool | str = "auto",
        is_main_process: bool = True,
        path_initial_model_for_weight_conversion: str | Path | None = None,
        **kwargs: Any,
    ) -> None:
        """Write each adapter as PEFT does: `default` in the directory, others in `dir/<name>/`,
        each with `adapter_config.json`, its tensors and a model card (`README.md`).

        `safe_serialization=False` writes PEFT's pickle file `adapter_model.bin` instead of
        safetensors (tilpass reads it back with torch's weights-only loader, with a warning);
        `save_embedding_layers` (True / False / "auto") adds the base embedding weights as PEFT
        does when embedding layers are adapted. `path_initial_model_for_weight_conversion`
        (PEFT's) saves a PiSSA / OLoRA adapter as the plain LoRA adapter (rank 2r) that gives
        the same outputs on the original base model, from the adapter saved in that directory
        right after `get_peft_model` (`methods/lora/conversion.py`).
        """
        save_adapters(
            self,
            save_directory,
            safe_serialization,
            selected_adapters,
            save_embedding_layers,
            is_main_process,
            path_initial_model_for_weight_conversion,
            **kwargs,
        )

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | Path,
        adapter_name: str = DEFAULT,
        is_trainable: bool = False,
        config: AdapterConfig | None = None,
        autocast_adapter_dtype: bool = True,
        *,
        low_cpu_mem_usage: bool = False,
        torch_device: str | torch.device | None = None,
        allow_pickle: bool = False,
        allow_partial: bool = False,
        device_map: Any = None,
    ) -> AdaptedModel:
        """Wrap `model` and load the adapter saved in `model_id` (a local directory).

        As in PEFT, an adapter loaded with `is_trainable=False` is frozen and the model is put
        in eval mode (dropout off); `config` replaces the directory's `adapter_config.json`.
        `device_map` naming one device moves the model there first ("auto" and the like keep
        it where it is; see `tilpass.device_map`).
        """
        device = target_device(device_map)
        if device is not None:
            model.to(device)
            torch_device = torch_device if torch_device is not None else device
        adapted = cls(model)
        adapted.load_adapter(
            model_id,
            adapter_name,
            is_trainable,
            torch_device,
            autocast_adapter_dtype,
            low_cpu_mem_usage=low_cpu_mem_usage,
            allow_pickle=allow_pickle,
            allow_partial=allow_partial,
            config=config,
        )
        adapted.set_adapter(adapter_name, inference_mode=not is_trainable)
        if config is not None:  # PEFT keeps the caller's config object, updated
            stored = adapted.peft_config[adapter_name]
            for field in dataclasses.fields(stored):
                setattr(config, field.name, getattr(stored, field.name))
            adapted.peft_config[adapter_name] = config
        return adapted

    def push_to_hub(self: AdaptedModel, *args: Any, **kwargs: Any) -> None:
        """Not available: tilpass talks to no model hub. Save with `save_pretrained` and upload
        the directory with `huggingface_hub` (`HfApi().upload_folder`)."""
        raise NotImplementedError(
            "tilpass has no model hub client: save_pretrained(directory), then upload the "
            "directory with huggingface_hub's HfApi().upload_folder"
        )

    def load_adapter(
        self: AdaptedModel,
        model_id: str | Path,
        adapter_name: str,
        is_trainable: bool = False,
        torch_device: str | torch.device | None = None,
        autocast_adapter_dtype: bool = True,
        *,
        low_cpu_mem_usage: bool = False,
        allow_pickle: bool = False,
        allow_partial: bool = False,
        config: AdapterConfig | None = None,
    ) -> _IncompatibleKeys:
        """Load an adapter directory under `adapter_name`; strict unless `allow_partial`.
        Returns PEFT's load result (`missing_keys`, `unexpected_keys`; empty unless partial).

        The adapter is added, filled from the file and checked key by key; on any mismatch it
        is removed again, so a failed load leaves the model as it was. Reading skips the
        random initialisation, so `low_cpu_mem_usage` is always in effect. With
        `is_trainable=False` the model is put in eval mode, as PEFT does.
        """
        directory = Path(model_id)
        config = read_adapter_config(directory, is_trainable, config)
        options = {
            "allow_pickle": allow_pickle,
            "allow_partial": allow_partial,
            "torch_device": torch_device,
            "autocast_adapter_dtype": autocast_adapter_dtype,
        }
        result = load_adapter_dir(self, directory, adapter_name, config, options)
        if not is_trainable:
            self.eval()  # as PEFT: dropout off for an adapter loaded for inference
        return result
