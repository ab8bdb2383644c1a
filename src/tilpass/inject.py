"""Find the modules a config targets and wrap them in its method's adapter layers.

Method-agnostic: the method (from the registry) supplies the layer factory and, if it places
itself other than by name, its own target selection; everything here works on any
`AdapterLayer`.

Matching follows PEFT's rules so configs mean the same in both libraries:
- a list of names matches a module whose full name equals an entry or ends with `.entry`;
- a string is a regex matched against the whole module name;
- "all-linear" is every Linear / Conv1D except the model's output head.
Unlike PEFT, every entry of a list must match something: a typo ("q_porj") is an error that
lists the module names that exist, instead of a silently smaller adapter.
"""

from __future__ import annotations

import re
import warnings
from collections import defaultdict
from collections.abc import Iterator
from functools import partial
from typing import TYPE_CHECKING

from torch import nn

from tilpass import weight_tying
from tilpass.config import TargetedConfig
from tilpass.errors import NoMatchingPeftModuleError, TargetModulesError
from tilpass.layers import AdapterLayer, is_linear_like
from tilpass.saved_modules import ModulesToSave

if TYPE_CHECKING:  # importing the registry here would import every method, which imports this
    from tilpass.methods.registry import Method

ALL_LINEAR = "all-linear"
CONTAINERS = (nn.ModuleDict, nn.ModuleList, nn.ParameterDict, nn.ParameterList)
"""Modules that only hold others (PEFT refuses them in `modules_to_save`)."""


def base_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """`named_modules` of the base model, not descending into tilpass's own wrappers (except
    those around a block whose modules stay targetable, such as a bottleneck's MLP)."""
    skip: tuple[str, ...] = ()
    for name, module in model.named_modules():
        if skip and name.startswith(skip):
            continue
        if isinstance(module, AdapterLayer) and not module.HOLDS_TARGETS:
            skip = (*skip, name + ".")
        yield name, module


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    """Every adapter layer in `model` (any method, `modules_to_save` too), with its path."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            yield name, module


def mark_shared_weights(model: nn.Module) -> list[tuple[str, AdapterLayer]]:
    """Tell each mergeable layer which other modules use the tensors merging would change.

    A tied weight (GPT-2's wte is lm_head's weight) is then merged on a private copy. Returns
    (path, layer) for each layer with a shared tensor, so the caller can say what merging
    unties. The comparison uses the layer's original tensors, not a merge's private copy.
    """
    users: dict[int, list[str]] = defaultdict(list)
    for name, param in model.named_parameters(remove_duplicate=False):
        users[id(param)].append(name)
    layers = [(n, m) for n, m in adapter_layers(model) if m.MERGEABLE]
    originals = {}
    for name, layer in layers:
        for target in layer.merge_targets():
            original = layer.original_tensor(target)
            originals[(name, target)] = original
            if original is not getattr(layer, target):
                users[id(original)].append(f"{name}.{target}")
    shared = []
    for name, layer in layers:
        found = {
            target: [u for u in users[id(originals[(name, target)])] if u != f"{name}.{target}"]
            for target in layer.merge_targets()
        }
        layer.mark_shared(found)
        if any(found.values()):
            shared.append((name, layer))
    return shared


def _is_linear(module: nn.Module) -> bool:
    if isinstance(module, AdapterLayer):
        module = module.base_layer
    return is_linear_like(module)


def _name_matches(name: str, entry: str) -> bool:
    return name == entry or name.endswith("." + entry)


def _matches(name: str, spec: list[str] | str | None) -> bool:
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(_name_matches(name, entry) for entry in spec)


def matches_target(name: str, module: nn.Module, spec: list[str] | str | None) -> bool:
    """Whether `target_modules` (`spec`) names module `name` (by name, regex or, for
    "all-linear", by being linear-like); the output head counts too."""
    if spec == ALL_LINEAR:
        return _is_linear(module)
    return _matches(name, spec)


def _output_head_names(model: nn.Module) -> set[str]:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    names = {n for n, m in model.named_modules() if head is not None and m is head}
    return names or {n for n, _ in model.named_modules() if n.split(".")[-1] == "lm_head"}


def _in_layers(name: str, config: TargetedConfig) -> bool:
    """PEFT's rule: with `layers_to_transform`, the first numbered segment after a layer
    list (`layers_pattern`, or any name) must be one of the wanted indices."""
    wanted = getattr(config, "layers_to_transform", None)  # not every method has it
    if wanted is None or (isinstance(wanted, list) and not wanted):
        return True
    patterns = getattr(config, "layers_pattern", None)
    if isinstance(patterns, str):
        patterns = [patterns]
    # Lazy: the first index counts, not a nested one (an expert's index inside a layer).
    regexes = (
        [rf"(?:^|.*?\.){p}\.(\d+)\." for p in patterns] if patterns else [r".*?\.[^.]*\.(\d+)\."]
    )
    for regex in regexes:
        found = re.match(regex, name)
        if found:
            index = int(found.group(1))
            return index == wanted if isinstance(wanted, int) else index in wanted
    return False


def _in_saved(name: str, config: TargetedConfig) -> bool:
    """Whether `name` is (inside) a `modules_to_save` module: those are trained whole, so PEFT
    never puts an adapter layer on them."""
    saved = getattr(config, "modules_to_save", None) or []
    return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", name) for m in saved)


def describe_modules(model: nn.Module) -> str:
    """Leaf module names grouped by kind, for error messages ("Linear: q_proj, v_proj; ...")."""
    kinds: dict[str, set[str]] = defaultdict(set)
    for name, module in base_modules(model):
        if name and (not list(module.children()) or isinstance(module, AdapterLayer)):
            kind = "Linear" if _is_linear(module) else type(module).__name__
            kinds[kind].add(name.split(".")[-1])
    return "; ".join(f"{kind}: {', '.join(sorted(names))}" for kind, names in sorted(kinds.items()))


def find_targets(model: nn.Module, config: TargetedConfig) -> list[str]:
    """Names of the modules `config` adapts; raises if nothing is left to adapt or if an entry
    of a list matches nothing."""
    spec = config.target_modules
    if spec is None:
        raise TargetModulesError(
            "target_modules is not set. Please specify `target_modules` in the config: the "
            "modules to adapt, e.g. ['q_proj', 'v_proj'] or 'all-linear'. This model has: "
            f"{describe_modules(model)}"
        )
    modules = [(n, m) for n, m in base_modules(model) if n]
    if spec == ALL_LINEAR:
        heads = _output_head_names(model)
        matched = [n for n, m in modules if _is_linear(m) and n not in heads]
    else:
        matched = [n for n, _ in modules if _matches(n, spec)]
    found = [
        n for n in matched if not _matches(n, config.exclude_modules) and _in_layers(n, config)
    ]
    saved = [n for n in found if _in_saved(n, config)]
    if saved:
        warnings.warn(
            f"{', '.join(saved)} {'is' if len(saved) == 1 else 'are'} also in modules_to_save: "
            "trained as a whole copy, without an adapter layer (as PEFT does)",
            stacklevel=4,
        )
        found = [n for n in found if n not in saved]
    if not found:
        raise _nothing_targeted(model, config, [n for n, _ in modules])
    missing = [] if spec == ALL_LINEAR else _missing_entries(spec, [n for n, _ in modules])
    if missing:
        raise NoMatchingPeftModuleError(_not_found(model, missing))
    if config.exclude_modules and not any(_matches(n, config.exclude_modules) for n in matched):
        warnings.warn(
            f"You have passed exclude_modules={config.exclude_modules!r} but no modules were "
            "excluded. Please check that exclude_modules was set correctly.",
            stacklevel=4,
        )
    return found


def _missing_entries(spec: list[str] | str, names: list[str]) -> list[str]:
    """The entries of `spec` (a list, or one regex) that match no module name."""
    if isinstance(spec, str):
        return [] if any(_matches(n, spec) for n in names) else [spec]
    return [e for e in spec if not any(_name_matches(n, e) for n in names)]


def _not_found(model: nn.Module, entries: list[str]) -> str:
    """PEFT's words for entries that match nothing, and the modules that do exist."""
    return (
        f"Target modules {entries} not found in the base model: target_modules entry "
        f"{', '.join(map(repr, entries))} matches no module of {type(model).__name__}. "
        f"Modules by kind: {describe_modules(model)}"
    )


def _nothing_targeted(
    model: nn.Module, config: TargetedConfig, names: list[str]
) -> NoMatchingPeftModuleError:
    """PEFT's error for a config that adapts no module, told apart as PEFT does: every module
    excluded, none matched, or the matches all excluded (or in modules_to_save)."""
    spec = config.target_modules
    excluded = [n for n in names if _matches(n, config.exclude_modules) or _in_saved(n, config)]
    if spec == ALL_LINEAR:
        matched: set[str] = set()
    else:
        matched = {n for n in names if _matches(n, spec) and _in_layers(n, config)}
    unmatched = [n for n in names if n not in excluded and n not in matched]
    settings = (
        f"target_modules={spec!r}, exclude_modules={config.exclude_modules!r}, "
        f"layers_to_transform={getattr(config, 'layers_to_transform', None)!r} and "
        f"modules_to_save={getattr(config, 'modules_to_save', None)!r}"
    )
    if excluded and not unmatched:
        return NoMatchingPeftModuleError(
            "All modules were excluded. This is likely unintended. Check your "
            f"`target_modules`, `exclude_modules` and `modules_to_save` configuration: {settings} "
            "leaves no module to adapt"
        )
    if unmatched and not excluded:
        missing = _missing_entries(spec, names) if spec != ALL_LINEAR else [spec]
        if missing:
            return NoMatchingPeftModuleError(_not_found(model, missing))
        return NoMatchingPeftModuleError(
            f"Target modules {spec!r} not found in the base model: {settings} leave none of "
            "the modules they name"
        )
    return NoMatchingPeftModuleError(
        "No modules were targeted for adaptation. This might be caused by a combination of "
        f"{settings}, which leaves no module to adapt (a module in modules_to_save is trained "
        "whole, not adapted)"
    )


def warn_unmatched_patterns(config: TargetedConfig, names: list[str]) -> None:
    """Warn about `rank_pattern` / `alpha_pattern` keys that match no adapted module (PEFT's
    rule: a key matches a module name as a dotted suffix or regex); such a key does nothing.
    A config whose pattern fields mean something else names the ones that hold module
    patterns in `MODULE_PATTERN_FIELDS`."""
    for field in getattr(config, "MODULE_PATTERN_FIELDS", ("rank_pattern", "alpha_pattern")):
        patterns = getattr(config, field, None) or {}
        unmatched = sorted(
            key for key in patterns if not any(re.match(rf"(.*\.)?({key})$", n) for n in names)
        )
        if unmatched:
            warnings.warn(
                f"The following {field} keys did not match any targeted module (targeted: "
                f"{', '.join(names)}) and were ignored: {unmatched}. A key matches a module "
                "name as a dotted suffix or a regex; check it for typos",
                RuntimeWarning,
                stacklevel=4,
            )


def _no_module_matched(model: nn.Module, config: TargetedConfig) -> bool:
    """PEFT's rule for a config with `target_parameters` that matched: `target_modules` that
    match no module at all are warned about (only the parameters are adapted), not refused."""
    spec = config.target_modules
    if not getattr(config, "target_parameters", None) or spec == ALL_LINEAR:
        return False
    if any(_matches(n, spec) for n, _ in base_modules(model) if n):
        return False
    shown = spec if isinstance(spec, str) else "{" + ", ".join(map(repr, spec or [])) + "}"
    warnings.warn(
        f"target_modules={shown} were set but no module was matched. Only the "
        "target_parameters are adapted; check target_modules for typos (module names are "
        f"matched as dotted suffixes). Modules by kind: {describe_modules(model)}",
        RuntimeWarning,
        stacklevel=4,
    )
    return True


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the module called `name` is."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, AdapterLayer):
        parent.replace_child(child, new)
    else:
        setattr(parent, child, new)


def inject(
    model: nn.Module,
    method: Method,
    config: TargetedConfig,
    adapter_name: str,
    adapter_id: int,
    initialize: bool = True,
) -> list[str]:
    """Add adapter `adapter_name` to every module `config` targets, wrapping new ones.

    With `initialize=False` the adapter's tensors are allocated but not initialised (a load
    fills them next; random initialisation of large adapters costs more than reading them).

    Returns:
        The adapted module names.
    """
    select = method.select_targets or find_targets
    tying = weight_tying.plan_tying(model, config, method)  # may move targets to the embedding
    saved = find_saved(model, getattr(config, "modules_to_save", None))
    for name in saved:
        if isinstance(model.get_submodule(name), CONTAINERS):
            raise TypeError(
                f"modules_to_save cannot be applied to modules of type "
                f"{type(model.get_submodule(name))} ({name!r}): a container is never called "
                "itself, so a trained copy would do nothing; name the modules in it instead"
            )
    extras = config.extra_layers(model, initialize)
    only_extras = bool(extras) and not getattr(config, "target_modules", None)
    if only_extras or (extras and _no_module_matched(model, config)):
        names = []
    else:
        names = weight_tying.split_tied(tying, select(model, config))
    warn_unmatched_patterns(config, names)
    for name in names:
        layer = _layer_for(model, name, method)
        try:
            layer.add_adapter(adapter_name, adapter_id, config.layer_spec(name, initialize))
        except NotImplementedError as exc:
            raise TargetModulesError(f"{name}: {exc}") from exc
    for name in saved:
        module = model.get_submodule(name)
        if not isinstance(module, ModulesToSave):
            module = ModulesToSave(module).train(module.training)
            replace_module(model, name, module)
        module.add_adapter(adapter_name, adapter_id, None)
    if tying is not None:
        layer_at = partial(_layer_for, model, method=method)
        tied = weight_tying.tie(
            model, tying, method, config, adapter_name, adapter_id, initialize, layer_at
        )
        names += tied
    for entry, factory, spec in extras:
        for name in find_saved(model, [entry]):
            module = model.get_submodule(name)
            if not isinstance(module, AdapterLayer):
                module = factory(module).train(module.training)
                replace_module(model, name, module)
            elif not _same_method(module, method):
                raise TargetModulesError(f"{name} already carries a {type(module).__name__}")
            module.add_adapter(adapter_name, adapter_id, spec)
    return names


def _layer_for(model: nn.Module, name: str, method: Method) -> AdapterLayer:
    """The method's layer at `name`: the existing one, or a new one wrapping the module."""
    module = model.get_submodule(name)
    if isinstance(module, AdapterLayer):
        if not _same_method(module, method):
            raise TargetModulesError(
                f"{name} already carries a {type(module).__name__}; one module takes adapters "
                "of one method (delete the other method's adapters first)"
            )
        return module
    try:
        layer = method.make_layer(module)
    except TypeError as exc:
        raise TargetModulesError(
            f"target_modules matched {name!r} ({type(module).__name__}): {exc}. "
            "Name the layers inside it instead."
        ) from exc
    layer.train(module.training)  # eval stays eval (no dropout)
    replace_module(model, name, layer)
    return layer


def _same_method(layer: AdapterLayer, method: Method) -> bool:
    """A method's layers: those its `owns_layer` claims, else those defined in the module of its
    factory or in that module's package."""
    if method.owns_layer is not None:
        return method.owns_layer(layer)
    home = method.make_layer.__module__
    return type(layer).__module__ == home or type(layer).__module__.startswith(home + ".")


def find_saved(model: nn.Module, entries: list[str] | None) -> list[str]:
    """Modules named by `modules_to_save` (dotted-suffix match); raises for an unmatched entry."""
    if not entries:
        return []
    modules = [n for n, _ in base_modules(model) if n]
    found = []
    for entry in entries:
        hits = [n for n in modules if _name_matches(n, entry)]
        if not hits:
            raise TargetModulesError(
                f"modules_to_save entry {entry!r} matches no module. "
                f"Modules by kind: {describe_modules(model)}"
            )
        found += hits
    return found


def unwrap_all(model: nn.Module, merge: bool) -> nn.Module:
    """Replace every adapter layer by its module (merging first if `merge`).

    A merged layer whose weight another module shares (a tied embedding) gets its own copy;
    the model's config then stops declaring the tie, so saving and reloading keep both.
    """
    if merge:
        untied = [
            (name, layer.shared_with())
            for name, layer in mark_shared_weights(model)
            if any(a in layer.specs for a in layer.active)
        ]
        if untied:
            _untie_config(model, untied)
    for name, layer in list(adapter_layers(model)):
        replace_module(model, name, layer.unwrap(merge))
    return model


def _untie_config(model: nn.Module, untied: list[tuple[str, list[str]]]) -> None:
    """Record that merging untied shared weights, and warn: the saved model grows."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False
    where = "; ".join(f"{name}.weight (shared with {', '.join(other)})" for name, other in untied)
    warnings.warn(
        f"merging untied {where}: the merged layer gets its own weight so the other module "
        "keeps the base weight and outputs match the unmerged model; the model's config now "
        "has tie_word_embeddings=False.",
        stacklevel=3,
    )
