"""Fold an AdaLoRA adapter into a plain LoRA adapter that gives the same outputs.

Per module, the kept triplets (Lambda_i != 0) become a LoRA pair of that module's rank:

    A = Lambda P      (r_m, in)        B = s Q           (out, r_m)

with AdaLoRA's scale s = lora_alpha / (init_r + 1e-5) folded into B. The LoRA config has
r = the largest kept rank, lora_alpha = r, and `rank_pattern` = `alpha_pattern` = the other
modules' ranks, so every module's LoRA scale is exactly 1, both for PEFT (which reads the
patterns) and for servers that apply one alpha / r to every module. Modules whose triplets were
all pruned are left out (`target_modules` then lists the kept modules by path).
"""

from __future__ import annotations

import os
import secrets
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from tilpass.adapter_files import WEIGHTS_NAME, load_tensors, save_tensors
from tilpass.config import read_config_dict
from tilpass.errors import AdapterFileError
from tilpass.methods.adalora.config import AdaLoraConfig
from tilpass.methods.lora.config import LoraConfig

SUFFIXES = (".lora_A", ".lora_E", ".lora_B")


def to_lora(
    config: AdaLoraConfig, tensors: dict[str, torch.Tensor], source: str = "adapter"
) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """The LoRA config and tensors (PEFT's keys) equal to an AdaLoRA adapter's."""
    modules = sorted({k[: -len(".lora_E")] for k in tensors if k.endswith(".lora_E")})
    if not modules:
        raise AdapterFileError(f"{source}: no AdaLoRA tensors (keys ending in .lora_E) found")
    out: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for module in modules:
        try:
            p, e, q = (tensors[module + s] for s in SUFFIXES)
        except KeyError as exc:
            raise AdapterFileError(
                f"{source}: {exc.args[0]} is missing beside {module}.lora_E"
            ) from None
        keep = e.view(-1) != 0  # pruned triplets have Lambda_i = 0
        rank = int(keep.sum())
        if rank == 0:
            continue
        scale = config.layer_spec(module.removeprefix("base_model.model."), True).scale
        dtype = torch.promote_types(p.dtype, torch.float32)
        out[f"{module}.lora_A.weight"] = (e[keep].to(dtype) * p[keep].to(dtype)).to(p.dtype)
        out[f"{module}.lora_B.weight"] = (q[:, keep].to(dtype) * scale).to(q.dtype)
        ranks[module] = rank
    if not ranks:
        raise AdapterFileError(f"{source}: every triplet is pruned (all lora_E are zero)")
    others = {k: v for k, v in tensors.items() if not k.endswith(SUFFIXES)}
    out.update(others)
    return lora_config(config, ranks, len(modules)), out


def lora_config(config: AdaLoraConfig, ranks: dict[str, int], modules: int) -> LoraConfig:
    """A LoRA config with scale 1 in every module of `ranks` ({file key prefix: rank}) of
    the AdaLoRA adapter's `modules` modules."""
    paths = {key.removeprefix("base_model.model."): rank for key, rank in ranks.items()}
    r = max(paths.values())  # the largest rank: what a server checks against its maximum
    pattern = {_exact(path): rank for path, rank in paths.items() if rank != r}
    targets = config.target_modules
    pruned_away = len(paths) < modules
    if pruned_away:
        targets = sorted(paths)
    with warnings.catch_warnings():  # AdaLoRA's low ranks are its result, not a mistake
        warnings.filterwarnings("ignore", message="LoRA rank")
        return _lora_config(config, targets, pruned_away, r, pattern)


def _lora_config(
    config: AdaLoraConfig, targets: Any, pruned_away: bool, r: int, pattern: dict[str, int]
) -> LoraConfig:
    return LoraConfig(
        r=r,
        lora_alpha=r,
        rank_pattern=pattern,
        alpha_pattern={key: float(rank) for key, rank in pattern.items()},
        target_modules=targets,
        exclude_modules=config.exclude_modules,
        modules_to_save=config.modules_to_save,
        fan_in_fan_out=config.fan_in_fan_out,
        layers_to_transform=None if pruned_away else config.layers_to_transform,
        layers_pattern=None if pruned_away else config.layers_pattern,
        task_type=config.task_type,
        base_model_name_or_path=config.base_model_name_or_path,
        revision=config.revision,
        inference_mode=True,
    )


def _exact(path: str) -> str:
    """A pattern key that matches module `path` only (PEFT matches keys as dotted suffixes
    or regexes; the anchor stops `layers.1.q_proj` from also matching `layers.11.q_proj`)."""
    return "^" + path.replace(".", r"\.")


def export_lora(source: str | Path, out: str | Path) -> LoraConfig:
    """Read the AdaLoRA adapter directory `source`, write its LoRA equal into `out`.

    `out` must not exist; it is written under a temporary name and renamed into place.
    """
    source, out = Path(source), Path(out)
    data = read_config_dict(source)
    where = str(source / "adapter_config.json")
    if data["peft_type"] != AdaLoraConfig.PEFT_TYPE:
        raise AdapterFileError(
            f"{where}: peft_type is {data['peft_type']!r}; --to lora exports ADALORA adapters"
        )
    if out.exists():
        raise FileExistsError(f"{out} exists already; choose a new --out directory")
    config = AdaLoraConfig.from_dict(data, source=where)
    config_out, tensors = to_lora(config, load_tensors(source), str(source / WEIGHTS_NAME))
    staging = out.with_name(f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    staging.mkdir(parents=True)
    try:
        save_tensors(staging / WEIGHTS_NAME, tensors, metadata={"format": "pt"})
        config_out.save(staging)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return config_out
