"""PEFT's `ensure_weight_tying`: one adapter shared by an input embedding and the layers whose
weight is that embedding's (a tied `lm_head`, an encoder-decoder's per-stack embeddings).

When a model ties `lm_head.weight` to `embed_tokens.weight`, an adapter trained on one of the
two alone unties them: the two layers no longer compute from one matrix. With
`ensure_weight_tying=True` the adapter lives on the input embedding and the tied layers share
it: a `modules_to_save` copy of a tied layer uses the embedding copy's weight, and a LoRA
adapter on a tied layer uses the embedding adapter's factors (its method does the sharing,
`Method.tie_layer`). Without the option, targeting a tied layer warns, as PEFT does.

Which layers are tied follows PEFT: the model's `_tied_weights_keys` (a list of parameter
names, or a {tied: source} mapping resolved against `get_input_embeddings()`), nothing when
the model's config says `tie_word_embeddings=False`. This module knows no method.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch import nn

from tilpass.layers import AdapterLayer
from tilpass.saved_modules import ModulesToSave, TiedCopy

if TYPE_CHECKING:  # the registry imports every method, which imports the core
    from tilpass.methods.registry import Method

EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")
"""The layer names PEFT treats as (possibly tied) embeddings in `modules_to_save` and
`target_modules`."""

_CONSEQUENCE = (
    "This can lead to complications, for example when merging the adapter or converting your "
    "model to formats other than safetensors."
)
NOT_REQUESTED = (
    "Model has `tie_word_embeddings=True` and a tied layer is part of the adapter, but "
    f"`ensure_weight_tying` is not set to True. {_CONSEQUENCE} Pass ensure_weight_tying=True to "
    "share one adapter between the tied layers."
)
NO_IMPLEMENTATION = (
    "Model has `tie_word_embeddings=True` and a tied layer is part of the adapter, but no "
    f"implementation exists to tie the adapters. {_CONSEQUENCE}"
)
NOTHING_TIED_TARGETED = (
    "You have requested `ensure_weight_tying`, but no tied modules are added in either "
    "`modules_to_save` or `target_modules`; name the input embedding or a layer tied to it "
    "there, or leave ensure_weight_tying unset."
)
NO_TIED_MODULES = (
    "You have requested `ensure_weight_tying`, but no tied modules were found in the model "
    "(no `_tied_weights_keys`, or its config has tie_word_embeddings=False); the adapter is "
    "added without tying."
)


@dataclasses.dataclass(frozen=True)
class TyingPlan:
    """What `ensure_weight_tying` does for one adapter.

    Attributes:
        embedding: the input embedding's module path (it carries the shared adapter).
        tied: paths of the modules whose weight is the embedding's.
        saved: True when the tie goes through `modules_to_save` (whole copies), False when
            through `target_modules` (the method's adapter layers).
    """

    embedding: str
    tied: tuple[str, ...]
    saved: bool


def tied_module_names(model: nn.Module) -> list[str]:
    """Paths of the modules whose weight is tied to the input embedding (PEFT's rule)."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "tie_word_embeddings", None) is False:
        return []  # the checkpoint turns tying off, whatever the architecture allows
    keys = getattr(model, "_tied_weights_keys", None)
    if not keys:
        return []
    names = _mapped_tied_names(model) if isinstance(keys, dict) else list(keys)
    return sorted({_plain_name(n).rpartition(".")[0] for n in names})


def _plain_name(name: str) -> str:
    """A parameter's name in the base model, without the part a `modules_to_save` wrapper
    adds (`lm_head.original_module.weight` -> `lm_head.weight`)."""
    return name.replace(".original_module.", ".")


def _mapped_tied_names(model: nn.Module) -> list[str]:
    """The tied parameters of a {tied: source} `_tied_weights_keys` (submodules' included)
    whose source is a parameter of the input embedding."""
    get = getattr(model, "get_input_embeddings", None)
    if not callable(get):
        raise ValueError(
            f"{type(model).__name__} declares `_tied_weights_keys` as a mapping but has no "
            "`get_input_embeddings()`, so the layers tied to the embedding cannot be found; "
            "add that method, or leave ensure_weight_tying unset"
        )
    mapping: dict[str, str] = {}
    for path, module in model.named_modules():
        own = getattr(module, "_tied_weights_keys", None)
        if isinstance(own, dict):
            prefix = f"{path}." if path else ""
            mapping.update({prefix + k: prefix + v for k, v in own.items()})
    embedding_params = {id(p) for p in get().parameters()}
    sources = {
        _plain_name(n)
        for n, p in model.named_parameters(remove_duplicate=False)
        if id(p) in embedding_params
    }
    return [tied for tied, source in mapping.items() if source in sources]


def _names_embedding(entries: Any) -> bool:
    """Whether `target_modules` / `modules_to_save` name an embedding layer (PEFT's test:
    a list entry's last part, or a regex that matches the bare name)."""
    if isinstance(entries, str):
        return any(re.fullmatch(entries, name) for name in EMBEDDING_LAYER_NAMES)
    return any(str(e).split(".")[-1] in EMBEDDING_LAYER_NAMES for e in entries or [])


def plan_tying(model: nn.Module, config: Any, method: Method) -> TyingPlan | None:
    """Warn as PEFT does about adapters on tied layers and, with `ensure_weight_tying`, move
    the adapter to the input embedding: `config` (the adapter's own copy) is rewritten so its
    `modules_to_save` / `target_modules` name the embedding instead of the tied layers (the
    latter only for a method that can tie its layers). Returns what the injection must tie,
    or None."""
    in_saved = _names_embedding(getattr(config, "modules_to_save", None))
    in_targets = _names_embedding(getattr(config, "target_modules", None))
    if not (in_saved or in_targets or getattr(config, "ensure_weight_tying", False)):
        return None
    tied = tied_module_names(model)
    if not getattr(config, "ensure_weight_tying", False):
        if tied and (in_saved or in_targets):
            has_option = hasattr(config, "ensure_weight_tying")
            warnings.warn(NOT_REQUESTED if has_option else NO_IMPLEMENTATION, stacklevel=5)
        return None
    if not tied:
        warnings.warn(NO_TIED_MODULES, stacklevel=5)
        return None
    if not (in_saved or in_targets):
        warnings.warn(NOTHING_TIED_TARGETED, stacklevel=5)
        return None
    if not in_saved and method.tie_layer is None:
        warnings.warn(NO_IMPLEMENTATION, stacklevel=5)
        return None
    embedding = input_embedding_name(model)
    if in_saved:
        config.modules_to_save = _moved_to_embedding(config.modules_to_save, tied, embedding)
    else:
        config.target_modules = _targets_moved(config.target_modules, tied, embedding)
    return TyingPlan(embedding, tuple(t for t in tied if t != embedding), saved=in_saved)


def input_embedding_name(model: nn.Module) -> str:
    """The module path of `model.get_input_embeddings()`."""
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    for name, module in model.named_modules():
        if embedding is not None and module is embedding:
            return name
    raise ValueError(
        f"ensure_weight_tying=True needs the input embedding, but {type(model).__name__} has "
        "no `get_input_embeddings()` returning one of its modules; add that method, or leave "
        "ensure_weight_tying unset"
    )


def _moved_to_embedding(entries: list[str], tied: list[str], embedding: str) -> list[str]:
    """`entries` with the embedding added and, per tied module, the first entry naming it
    removed (PEFT's rule: the tied modules are handled by the tying, not by name)."""
    out = list(entries)
    if not any(embedding == e or embedding.endswith(f".{e}") for e in out):
        out.append(embedding)
    for key in tied:
        for entry in out:
            if entry != embedding and re.match(rf"(^|.*\.){entry}($|\..*)", key):
                out.remove(entry)
                break
    return out


def _targets_moved(targets: list[str] | str, tied: list[str], embedding: str) -> list[str] | str:
    """`target_modules` with the embedding added (and tied names removed from a list); a
    regex gets the embedding as an alternative (the tied modules are skipped when matching)."""
    if isinstance(targets, str):
        return rf"(?:{targets}|^{re.escape(embedding)}$)"
    return _moved_to_embedding(list(targets), tied, embedding)


def tie(
    model: nn.Module,
    plan: TyingPlan,
    method: Method,
    config: Any,
    adapter_name: str,
    adapter_id: int,
    initialize: bool,
    layer_at: Callable[[str], AdapterLayer],
) -> list[str]:
    """Give every tied module the embedding's adapter `adapter_name`; returns their paths.
    `layer_at(path)` is the method's layer there (the existing one, or a new one wrapping the
    module), as the injection finds it for a target."""
    source = model.get_submodule(plan.embedding)
    if plan.saved:
        if not isinstance(source, ModulesToSave):
            raise RuntimeError(f"{plan.embedding} should carry a modules_to_save copy by now")
        shared = TiedCopy(source.modules_to_save[adapter_name])
        for name in plan.tied:
            layer = _saved_layer(model, name)
            layer.add_adapter(adapter_name, adapter_id, shared)
        return []  # whole copies, not adapted modules
    if method.tie_layer is None:  # `plan_tying` plans no such tie
        raise RuntimeError(f"{method.name} cannot tie adapters to the input embedding")
    if not isinstance(source, AdapterLayer) or adapter_name not in source.specs:
        raise RuntimeError(f"{plan.embedding} should carry adapter {adapter_name!r} by now")
    for name in plan.tied:
        layer = layer_at(name)
        layer.add_adapter(adapter_name, adapter_id, config.layer_spec(name, initialize))
        method.tie_layer(layer, source, adapter_name)
        layer.invalidate()
    return list(plan.tied)


def _saved_layer(model: nn.Module, name: str) -> ModulesToSave:
    """The `modules_to_save` layer at `name`, wrapping the module there first (as the
    injection does for a `modules_to_save` entry)."""
    from tilpass.inject import replace_module  # inject imports this module

    module = model.get_submodule(name)
    if isinstance(module, ModulesToSave):
        return module
    layer = ModulesToSave(module).train(module.training)
    replace_module(model, name, layer)
    return layer


def split_tied(plan: TyingPlan | None, names: list[str]) -> list[str]:
    """`names` without the tied modules (those get the embedding's adapter instead)."""
    if plan is None:
        return names
    return [n for n in names if n not in plan.tied]
