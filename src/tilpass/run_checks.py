"""Checks of a run config that need the file system or the model's config, made before loading.

`build_config` checks each setting on its own (types, ranges, choices). `check_run` checks what
needs more than the setting: that the data files exist and can be evaluated, that the model
is a local model directory or the default model, and that the adapter's `target_modules`
match modules of that model, found by building the model from its `config.json` on the
`meta` device (no weights are read; it takes well under a second). Every message names where
the setting came from, the section and the key, so a mistake costs seconds, not a model load.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tilpass.config_yaml import ConfigSources
from tilpass.data.sources import peek_format
from tilpass.inject import find_targets
from tilpass.methods import method_of
from tilpass.pretrained import (
    DEFAULT_MODEL_ALIASES,
    converted_default_dir,
    is_default_converted,
    resolve_model_path,
)
from tilpass.run_config import RunConfig, RunConfigError


def check_run(config: RunConfig, sources: ConfigSources) -> None:
    """Raise `RunConfigError` for a data file, model or target module the run cannot use."""
    check_data(config, sources)
    model_dir = model_directory(config, sources)
    if model_dir is not None and config.adapter is not None:
        check_targets(model_dir, config, sources)


def check_data(config: RunConfig, sources: ConfigSources) -> None:
    """The data files exist, and the held-out file holds records that have answers or text."""
    data = config.data
    if not data.train:
        raise RunConfigError(
            f"{sources.origin('data', 'train')}: data: train is not set: give a training file "
            "(data.train in the YAML file, or --data.train PATH)"
        )
    for key in ("train", "eval"):
        path = getattr(data, key)
        if path and not Path(path).exists():
            raise RunConfigError(
                f"{sources.origin('data', key)}: data: {key}: {path}: no such file or directory"
            )
    if data.eval and data.format is None and peek_format(data.eval) is None:
        raise RunConfigError(
            f"{sources.origin('data', 'eval')}: data: eval: cannot tell the format of the first "
            f"record of {data.eval}; expected the keys of a chat, prompt_completion, alpaca or "
            "text record, or set data.format (--data.format)"
        )


def model_directory(config: RunConfig, sources: ConfigSources) -> Path | None:
    """The local directory of the run's model; None for the default model not yet converted
    (its architecture is fixed; it is converted when the run loads it)."""
    if config.model in DEFAULT_MODEL_ALIASES and not Path(config.model).is_dir():
        return converted_default_dir() if is_default_converted() else None
    try:
        return resolve_model_path(config.model)
    except (OSError, ValueError) as exc:
        raise RunConfigError(f"{sources.origin('model')}: model: {exc}") from exc


def check_targets(model_dir: Path, config: RunConfig, sources: ConfigSources) -> None:
    """The adapter's target modules match modules of the model (built on the meta device)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        hf_config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config)
    except (OSError, ValueError, KeyError) as exc:
        raise RunConfigError(
            f"{sources.origin('model')}: model: {model_dir} cannot be built from its "
            f"config.json ({exc})"
        ) from exc
    adapter = config.adapter
    if adapter is None:
        return
    select = method_of(adapter).select_targets or find_targets
    try:
        select(model, adapter)
    except ValueError as exc:  # TargetModulesError and the methods' own checks
        where = sources.origin(config.method, "target_modules")
        raise RunConfigError(f"{where}: {config.method}: target_modules: {exc}") from exc
