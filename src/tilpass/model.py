"""`AdaptedModel`: a base model plus named adapters, with PEFT's `PeftModel` method names.

The base model's modules are wrapped in place (base weights are never copied); each wrapper
holds every named adapter of that module. This class knows no method: it finds a config's
method in the registry and talks to layers only through the `AdapterLayer` protocol. It is the
API edge: adapter names (strings) become stable integer ids here before they reach a layer.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tilpass.adapter_files import WEIGHTS_NAME, load_tensors, save_tensors
from tilpass.config import AdapterConfig, read_config_dict
from tilpass.errors import AdapterFileError, AdapterNameError
from tilpass.inject import adapter_layers, inject, mark_shared_weights, replace_module, unwrap_all
from tilpass.layers import AdapterLayer
from tilpass.methods import UnknownMethodError, method_for_peft_type, method_of
from tilpass.quantize import BaseStorage, logical_numel, measure_storage
from tilpass.routing import BASE, AdapterIds, Routing, routed

PREFIX = "base_model.model."  # PEFT's key prefix for a model's adapter tensors
DEFAULT = "default"
LARGE_ADAPTER_FRACTION = 0.10


class AdaptedModel(nn.Module):
    """A base model with named adapters; `forward` and `generate` pass through to the base.

    Args:
        model: any `torch.nn.Module`; a Hugging Face model is the main case.
        config: if given, an adapter is added under `adapter_name` and activated.
        adapter_name: the name of that first adapter.
    """

    def __init__(
        self, model: nn.Module, config: AdapterConfig | None = None, adapter_name: str = DEFAULT
    ) -> None:
        super().__init__()
        self.base_model = model
        self.training = model.training  # a model in eval mode stays in eval mode
        self.adapter_ids = AdapterIds()
        self._layer_cache: list[AdapterLayer] | None = None
        self.peft_config: dict[str, AdapterConfig] = {}
        self._active: list[str] = []
        for p in model.parameters():
            p.requires_grad_(False)
        if config is not None:
            self.add_adapter(adapter_name, config)
            self.set_adapter(adapter_name)

    # -- passing through ----------------------------------------------------------------------
    def forward(
        self,
        *args: Any,
        adapter_names: list[str] | None = None,
        adapter_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run the base model; `adapter_names` (one per row) or `adapter_ids` (one per row,
        or one per token for packed ragged batches; -1 = base) route tokens to adapters."""
        routing = self._routing(adapter_names, adapter_ids, _batch_size(args, kwargs))
        if routing is None:
            return self.base_model(*args, **kwargs)
        with routed(routing):
            return self.base_model(*args, **kwargs)

    def generate(
        self,
        *args: Any,
        adapter_names: list[str] | None = None,
        adapter_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """The base model's `generate`, with optional per-row adapters."""
        if adapter_ids is not None and adapter_ids.dim() != 1:
            raise ValueError("generate takes one adapter id per row (adapter_ids of shape (B,))")
        routing = self._routing(adapter_names, adapter_ids, _batch_size(args, kwargs))
        if routing is None:
            return self.base_model.generate(*args, **kwargs)
        with routed(routing):
            return self.base_model.generate(*args, **kwargs)

    def get_base_model(self) -> nn.Module:
        """The wrapped model (with adapter layers in place; `unload` removes them)."""
        return self.base_model

    def adapter_id(self, adapter_name: str) -> int:
        """The stable integer id of an adapter (for `adapter_ids=`; -1 is the base model)."""
        self._check_name(adapter_name)
        return self.adapter_ids[adapter_name]

    def _layers(self) -> list[AdapterLayer]:
        """The adapter layers (cached: the hot paths must not walk the module tree each call)."""
        if self._layer_cache is None:
            self._layer_cache = [m for _, m in adapter_layers(self.base_model)]
        return self._layer_cache

    @property
    def config(self) -> Any:
        """The base model's config (for code that reads `model.config`)."""
        return getattr(self.base_model, "config", None)

    def _routing(
        self, names: list[str] | None, ids: torch.Tensor | None, batch: int | None
    ) -> Routing | None:
        """The routing of one call, or None for a plain call (nothing is kept on the model)."""
        if names is None and ids is None:
            return None
        if names is not None and ids is not None:
            raise ValueError("pass adapter_names or adapter_ids, not both")
        if names is not None:
            if isinstance(names, str):
                raise TypeError("adapter_names must be a list with one adapter name per row")
            ids = self.adapter_ids.ids_for(names)
        else:
            assert ids is not None
            ids = self.adapter_ids.check(ids)
        if batch is not None and ids.shape[0] != batch:
            what = "adapter_names" if names is not None else "adapter_ids"
            raise ValueError(
                f"{what} has {ids.shape[0]} entries but the batch has {batch} rows; "
                f"pass one per row ({BASE!r} / -1 for the base model)"
            )
        merged = sorted({n for layer in self._layers() for n in layer.merged})
        if merged:
            raise RuntimeError(
                f"adapters {merged} are merged into the weights, so rows cannot be routed; "
                "call unmerge_adapter() first"
            )
        return Routing(ids)

    # -- adapters -----------------------------------------------------------------------------
    def add_adapter(
        self, adapter_name: str, config: AdapterConfig, low_cpu_mem_usage: bool = False
    ) -> None:
        """Add a new adapter (not activated; see `set_adapter`).

        `low_cpu_mem_usage=True` (PEFT's name) skips initialising the new tensors, for callers
        that fill every one of them right after (as `load_adapter` does).
        """
        if adapter_name in self.peft_config:
            raise AdapterNameError(f"an adapter named {adapter_name!r} already exists")
        if adapter_name == BASE or not adapter_name or "." in adapter_name:
            raise AdapterNameError(
                f"invalid adapter name {adapter_name!r}: use a non-empty name without dots, "
                f"other than {BASE!r}"
            )
        try:
            method = method_of(config)
        except UnknownMethodError as exc:
            raise TypeError(f"unsupported config type {type(config).__name__}: {exc}") from None
        config = copy.deepcopy(config)  # the caller's config stays as it was
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = getattr(self.config, "name_or_path", None) or None
        adapter_id = self.adapter_ids.assign(adapter_name)
        try:
            inject(self.base_model, method, config, adapter_name, adapter_id, not low_cpu_mem_usage)
        except Exception:
            self._remove_traces(adapter_name)
            self.adapter_ids.release(adapter_name)
            raise
        self._layer_cache = None
        config.describe_layers([m for m in self._layers() if adapter_name in m.specs])
        self.peft_config[adapter_name] = config
        self._set_trainable(adapter_name, not config.inference_mode)

    def _set_trainable(self, adapter_name: str, trainable: bool) -> None:
        for p in self.adapter_parameters(adapter_name):
            p.requires_grad_(trainable)

    def adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        """The parameters of one adapter, in every layer (saved-module copies included)."""
        return [p for layer in self._layers() for p in layer.adapter_parameters(adapter_name)]

    def training_hooks(self) -> list[Any]:
        """Hooks the trainer calls for the active adapters' methods (loss terms and
        after-backward steps, e.g. AdaLoRA's); most methods have none."""
        hooks: list[Any] = []
        for name in self._active:
            method = method_of(self.peft_config[name])
            if method.training_hooks is not None:
                hooks += method.training_hooks(self, name)
        return hooks

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Activate one adapter, or several whose updates then add up."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for name in names:
            self._check_name(name)
        self._active = names
        for layer in self._layers():
            layer.active = list(names)

    @property
    def active_adapters(self) -> list[str]:
        """The names of the active adapters."""
        return list(self._active)

    @property
    def active_adapter(self) -> str | list[str]:
        """The active adapter's name (a list when several are active, as in PEFT)."""
        return self._active[0] if len(self._active) == 1 else list(self._active)

    def _check_name(self, name: str) -> None:
        if name not in self.peft_config:
            known = ", ".join(self.peft_config) or "(none)"
            raise AdapterNameError(f"no adapter named {name!r}; loaded adapters: {known}")

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter everywhere; layers left without adapters become base modules."""
        self._check_name(adapter_name)
        self._remove_traces(adapter_name)
        del self.peft_config[adapter_name]
        self.adapter_ids.release(adapter_name)
        remaining = [a for a in self._active if a != adapter_name]
        if not remaining and self.peft_config:
            remaining = [next(iter(self.peft_config))]
        self.set_adapter(remaining) if remaining else setattr(self, "_active", [])

    def _remove_traces(self, adapter_name: str) -> None:
        self._layer_cache = None
        for name, layer in list(adapter_layers(self.base_model)):
            layer.delete(adapter_name)
            if not layer.specs:
                replace_module(self.base_model, name, layer.unwrap(merge=False))

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the block the model is the base model; merged adapters are unmerged first."""
        layers = self._layers()
        merged = [list(layer.merged) for layer in layers]
        for layer in layers:
            layer.unmerge()
            layer.disabled = True
        try:
            yield
        finally:
            for layer, names in zip(layers, merged, strict=True):
                layer.disabled = False
                if names:
                    layer.merge(names)

    # -- merging ------------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: list[str] | None = None) -> None:
        """Fold adapters (default: the active ones) into the base weights; idempotent."""
        names = self._active if adapter_names is None else adapter_names
        for name in names:
            self._check_name(name)
        self._check_mergeable(names)
        mark_shared_weights(self.base_model)  # a tied weight is merged on a private copy
        for layer in self._layers():
            if layer.MERGEABLE:
                layer.merge(list(names))

    def _check_mergeable(self, names: list[str]) -> None:
        for layer in self._layers():
            if not layer.MERGEABLE and any(n in layer.specs for n in names):
                raise NotImplementedError(
                    f"{type(layer).__name__} adapters cannot be merged into the weights; keep "
                    "them loaded, or unload them"
                )

    def unmerge_adapter(self) -> None:
        """Take every merged adapter back out of the base weights."""
        for layer in self._layers():
            layer.unmerge()

    def merge_and_unload(self) -> nn.Module:
        """Merge the active adapters and return the plain base model (no wrappers left)."""
        self._check_mergeable(self._active)
        for layer in self._layers():
            layer.unmerge()  # so only the active adapters end up in the weights
            layer.active = list(self._active)
        self._layer_cache = None
        return unwrap_all(self.base_model, merge=True)

    def unload(self) -> nn.Module:
        """Return the base model as it was: adapters removed, nothing merged."""
        self._layer_cache = None
        return unwrap_all(self.base_model, merge=False)

    # -- counting -----------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts; shared (tied) tensors count once, and a packed
        4-bit weight counts the weights it holds (two per byte), as in PEFT."""
        trainable = total = 0
        for p in self.parameters():
            count = logical_numel(p)
            total += count
            trainable += count if p.requires_grad else 0
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Print PEFT's line: trainable params: N || all params: M || trainable%: P."""
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / max(total, 1):.4f}"
        )

    def base_storage(self) -> BaseStorage:
        """The base weights' resident bytes and, for a quantized base, bits per weight,
        measured from the tensors (the adapters' own tensors left out)."""
        adapters = {id(p) for name in self.peft_config for p in self.adapter_parameters(name)}
        return measure_storage(self.base_model, exclude=adapters)

    def print_base_storage(self) -> None:
        """Print the sibling line of `print_trainable_parameters`: the base's bytes and bits
        per weight (e.g. 4.127 for NF4 with double quantization)."""
        print(self.base_storage().describe())

    # -- files --------------------------------------------------------------------------------
    def adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The adapter's tensors under PEFT's keys (`base_model.model.<path>.lora_A.weight`)."""
        self._check_name(adapter_name)
        out: dict[str, torch.Tensor] = {}
        for path, layer in adapter_layers(self.base_model):
            for key, tensor in layer.adapter_tensors(adapter_name).items():
                out[f"{PREFIX}{path}.{key}"] = tensor
        return out

    def save_pretrained(
        self, save_directory: str | Path, selected_adapters: list[str] | None = None
    ) -> None:
        """Write each adapter as PEFT does: `default` in the directory, others in `dir/<name>/`."""
        names = list(self.peft_config) if selected_adapters is None else selected_adapters
        for name in names:
            self._check_name(name)
            target = Path(save_directory) if name == DEFAULT else Path(save_directory) / name
            tensors = self.adapter_state_dict(name)
            self._warn_if_large(name, tensors)
            save_tensors(target / WEIGHTS_NAME, tensors, metadata={"format": "pt"})
            config = copy.deepcopy(self.peft_config[name])
            config.inference_mode = True
            config.save(target)

    def _warn_if_large(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        base = sum(p.numel() * p.element_size() for p in self.base_model.parameters()) - size
        if size <= LARGE_ADAPTER_FRACTION * max(base, 1):
            return
        per_module: dict[str, int] = {}
        for path, layer in adapter_layers(self.base_model):
            parts = layer.adapter_tensors(name).values()
            per_module[path] = sum(t.numel() * t.element_size() for t in parts)
        top = sorted(per_module.items(), key=lambda kv: -kv[1])[:5]
        warnings.warn(
            f"adapter {name!r} is {size / 2**20:.1f} MiB, {100 * size / base:.0f}% of the base "
            f"model; the largest parts: {', '.join(f'{m} ({b / 2**20:.1f} MiB)' for m, b in top)}. "
            "Embedding or output-head layers in target_modules / modules_to_save make adapters "
            "large; leave them out unless the task needs them.",
            stacklevel=3,
        )

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | Path,
        adapter_name: str = DEFAULT,
        is_trainable: bool = False,
        allow_pickle: bool = False,
        allow_partial: bool = False,
    ) -> AdaptedModel:
        """Wrap `model` and load the adapter saved in `model_id` (a local directory)."""
        adapted = cls(model)
        adapted.load_adapter(model_id, adapter_name, is_trainable, allow_pickle, allow_partial)
        adapted.set_adapter(adapter_name)
        return adapted

    def load_adapter(
        self,
        model_id: str | Path,
        adapter_name: str,
        is_trainable: bool = False,
        allow_pickle: bool = False,
        allow_partial: bool = False,
    ) -> None:
        """Load an adapter directory under `adapter_name`; strict unless `allow_partial`.

        The adapter is added, filled from the file and checked key by key; on any mismatch it
        is removed again, so a failed load leaves the model as it was.
        """
        directory = Path(model_id)
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
        tensors = load_tensors(directory, allow_pickle=allow_pickle)
        # A strict load fills every tensor, so initialising them first would be wasted work;
        # a partial one keeps a proper initialisation for the keys the file lacks.
        self.add_adapter(adapter_name, config, low_cpu_mem_usage=not allow_partial)
        try:
            self._fill(adapter_name, tensors, directory, allow_partial)
        except Exception:
            self.delete_adapter(adapter_name)
            raise

    def _fill(
        self, name: str, tensors: dict[str, torch.Tensor], directory: Path, allow_partial: bool
    ) -> None:
        expected = self.adapter_state_dict(name)
        tensors = self._drop_unchanged_embeddings(tensors, directory)
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
                f"{where} does not match the model: {_key_report(missing, unexpected)}. "
                "Was it trained on another base model? Refusing to load part of an adapter; "
                "pass allow_partial=True to load the matching keys anyway."
            )
        if missing or unexpected:
            warnings.warn(
                f"{where}: partial load, {_key_report(missing, unexpected)}", stacklevel=3
            )
        with torch.no_grad():
            for key in set(expected) & set(tensors):
                expected[key].copy_(tensors[key])
        for layer in self._layers():
            layer.invalidate()

    def _drop_unchanged_embeddings(
        self, tensors: dict[str, torch.Tensor], directory: Path
    ) -> dict[str, torch.Tensor]:
        """PEFT also saves the base embedding matrix when embeddings are adapted; accept it
        when it equals ours, refuse it otherwise (tilpass never overwrites base weights)."""
        out = {}
        for key, value in tensors.items():
            if key.startswith(PREFIX) and key.endswith(".base_layer.weight"):
                path = key[len(PREFIX) : -len(".base_layer.weight")]
                try:
                    ours = self.base_model.get_submodule(path).weight
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


def _key_report(missing: list[str], unexpected: list[str], limit: int = 5) -> str:
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            shown = ", ".join(keys[:limit]) + (
                f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
            )
            parts.append(f"{len(keys)} {label} keys: {shown}")
    return "; ".join(parts)


def _batch_size(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    for value in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), *args[:1]):
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return int(value.shape[0])
    return None


def get_peft_model(
    model: nn.Module, config: AdapterConfig, adapter_name: str = DEFAULT
) -> AdaptedModel:
    """Wrap `model` with a new adapter: the base is frozen, the adapter trains."""
    return AdaptedModel(model, config, adapter_name)


PeftModel = AdaptedModel
