"""`tilpass export --fix`: the faithful conversions `export_check.py` proposes.

Padding ranks: every module's A (r_m, in) gains zero rows and its B (out, r_m) zero columns up
to one rank R, so B A is unchanged; the module's scale s_m = alpha_m / r_m (alpha_m / sqrt(r_m)
with rsLoRA) is folded into B as B * s_m / s with s = lora_alpha / R, so that one scale for the
whole adapter (what vLLM and LoRAX apply) gives every module its old update. Only rounding of
the folded factor differs (none where s_m = s). The result goes to a new directory, written
under a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from tilpass.adapter_files import WEIGHTS_NAME, save_tensors
from tilpass.config import CONFIG_NAME
from tilpass.export_check import LORA_KEY, AdapterFacts
from tilpass.methods.lora.config import pattern_value


def _scale(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / (math.sqrt(rank) if rslora else rank)


def padded_tensors(facts: AdapterFacts, rank: int) -> dict[str, torch.Tensor]:
    """The adapter's tensors with every module padded to `rank`, scales folded into B."""
    config = facts.config
    rslora = bool(config.get("use_rslora"))
    alpha = float(config.get("lora_alpha", 8))  # PEFT's default
    patterns = config.get("alpha_pattern") or {}
    target = _scale(alpha, rank, rslora)
    out = {}
    for key, tensor in load_file(str(facts.path / WEIGHTS_NAME)).items():
        match = LORA_KEY.match(key)
        if match is None:
            out[key] = tensor
            continue
        module, factor = match.groups()
        own = facts.ranks[module]
        if factor.endswith("A"):  # (r_m, in, ...) -> (R, in, ...)
            pad = tensor.new_zeros(rank - own, *tensor.shape[1:])
            out[key] = torch.cat([tensor, pad], dim=0)
            continue
        ratio = _scale(float(pattern_value(patterns, module, alpha)), own, rslora) / target
        scaled = tensor if ratio == 1.0 else (tensor.double() * ratio).to(tensor.dtype)
        pad = tensor.new_zeros(tensor.shape[0], rank - own, *tensor.shape[2:])
        out[key] = torch.cat([scaled, pad], dim=1)  # (out, r_m) -> (out, R)
    return out


def pad_ranks(facts: AdapterFacts, out: Path) -> int:
    """Write `facts`' adapter into the new directory `out` with one rank for every module;
    returns that rank."""
    if out.exists():
        raise FileExistsError(f"{out} already exists; give a new directory for --out")
    rank = max(facts.ranks.values())
    config = {**facts.config, "r": rank, "rank_pattern": {}, "alpha_pattern": {}}
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        staging.mkdir()
        save_tensors(staging / WEIGHTS_NAME, padded_tensors(facts, rank), {"format": "pt"})
        (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return rank
