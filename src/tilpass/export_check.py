"""Will this adapter load in vLLM, LoRAX or PEFT? Rules read from the adapter's files only.

Each rule looks at `adapter_config.json` and the tensor names and shapes in the safetensors
header (no tensor is read, no model is loaded) and returns findings, each with a severity:

- `blocks`: the server cannot load it, and no faithful conversion exists (DoRA, trained
  biases, `modules_to_save`, methods the server does not serve, modules it does not adapt);
- `conversion`: a faithful conversion exists in another command (AdaLoRA -> LoRA);
- `fixable`: `tilpass export --fix` converts it exactly (ranks padded with zero rows and
  columns, per-module scales folded into B);
- `option`: it loads once the server is started with an option (vLLM's `--max-lora-rank`).

The limits are the servers' documented defaults (vLLM: `--max-lora-rank` 16 by default, one of
1, 8, 16, 32, 64, 128, 256, 320, 512; one `lora_alpha / r` scale per adapter; no DoRA, no
trained biases, no `modules_to_save`). Module names are those of Llama-family models.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tilpass.adapter_files import WEIGHTS_NAME
from tilpass.config import read_config_dict

SERVERS = ("vllm", "lorax", "peft")
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_RANK = 16
LLAMA_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTED = {"vllm": set(LLAMA_LINEAR), "lorax": {*LLAMA_LINEAR, "lm_head"}}
"""The modules each server adapts in Llama-family models."""
PEFT_TYPES_IN_PEFT = {"LORA", "ADALORA", "IA3", "PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING"}
"""The methods tilpass writes that PEFT itself loads."""
PART_OF_LORA = (".lora_B.bias", ".lora_magnitude_vector", ".lora_magnitude_vector.weight")
"""LoRA tensors that are no factor (judged by the bias and DoRA rules)."""
LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(.+)\.(lora_(?:embedding_)?[AB])(?:\.weight)?$")


class ExportInputError(ValueError):
    """The directory is not an adapter `tilpass export` can read."""


@dataclass(frozen=True)
class Finding:
    """One reason an adapter will not load (or will only load after a step) on a server."""

    rule: str
    severity: str
    message: str
    fix: str | None = None


@dataclass
class AdapterFacts:
    """What the rules look at: the config, and per adapted module its rank."""

    path: Path
    config: dict[str, Any]
    ranks: dict[str, int] = field(default_factory=dict)  # module name -> rank (A's rows)
    other_tensors: list[str] = field(default_factory=list)  # keys that are no LoRA factor

    @property
    def peft_type(self) -> str:
        return str(self.config.get("peft_type", ""))


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor names, dtypes, shapes), tensors unread."""
    try:
        with path.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > 100_000_000:
                raise ValueError(f"header of {size} bytes")
            header = json.loads(f.read(size))
    except (OSError, struct.error, ValueError) as exc:
        raise ExportInputError(f"{path} is not a readable safetensors file ({exc})") from None
    header.pop("__metadata__", None)
    return header


def read_adapter(path: Path) -> AdapterFacts:
    """Read an adapter directory's config and tensor header, with a clear error when it is none."""
    config, weights = read_config_dict(path), path / WEIGHTS_NAME
    if not weights.is_file():
        raise ExportInputError(f"{path} has no {WEIGHTS_NAME}; the adapter's tensors are missing")
    facts = AdapterFacts(path, config)
    for key, info in safetensors_header(weights).items():
        match = LORA_KEY.match(key)
        if match is None and not key.endswith(PART_OF_LORA):
            facts.other_tensors.append(key)
        elif match is None:
            continue
        elif match.group(2).endswith("A"):
            facts.ranks[match.group(1)] = int(info["shape"][0])
    return facts


def _method(facts: AdapterFacts, server: str) -> list[Finding]:
    kind = facts.peft_type
    if kind == "LORA" or (server == "peft" and kind in PEFT_TYPES_IN_PEFT):
        return []
    if kind == "ADALORA":
        return [
            Finding(
                "method",
                "conversion",
                f"AdaLoRA adapters need conversion for {server}",
                f"run `tilpass export {facts.path} --to lora --out NEW_DIR`",
            )
        ]
    where = "PEFT has no such method" if server == "peft" else f"{server} serves LoRA only"
    return [Finding("method", "blocks", f"peft_type {kind}: {where}; no faithful conversion")]


def _dora(facts: AdapterFacts, server: str) -> list[Finding]:
    if server == "peft" or not facts.config.get("use_dora"):
        return []
    return [
        Finding(
            "dora",
            "blocks",
            f"DoRA (use_dora: true) is not supported by {server}; DoRA's normalisation has no "
            "exact plain-LoRA form",
            "merge it into the base (`tilpass merge`) and serve the merged model",
        )
    ]


def _saved_modules(facts: AdapterFacts, server: str) -> list[Finding]:
    saved = facts.config.get("modules_to_save") or []
    if server == "peft" or facts.peft_type != "LORA" or not (saved or facts.other_tensors):
        return []
    names = ", ".join(saved) or ", ".join(facts.other_tensors[:3])
    return [
        Finding(
            "modules_to_save",
            "blocks",
            f"{server} loads only LoRA factors; this adapter also saves whole modules ({names})",
            "merge it into the base (`tilpass merge`) and serve the merged model",
        )
    ]


def _bias(facts: AdapterFacts, server: str) -> list[Finding]:
    trained = facts.config.get("bias", "none") not in (None, "none")
    lora_bias = bool(facts.config.get("lora_bias"))
    if server == "peft" or not (trained or lora_bias):
        return []
    what = f"bias: {facts.config.get('bias')!r}" if trained else "lora_bias: true"
    return [
        Finding(
            "bias",
            "blocks",
            f"{server} does not load trained biases ({what})",
            "merge it into the base (`tilpass merge`) and serve the merged model",
        )
    ]


def _targets(facts: AdapterFacts, server: str) -> list[Finding]:
    if server == "peft" or facts.peft_type != "LORA":
        return []
    leaves = sorted({name.rsplit(".", 1)[-1] for name in facts.ranks} - ADAPTED[server])
    if not leaves:
        return []
    return [
        Finding(
            "target_modules",
            "blocks",
            f"{server} does not adapt {', '.join(leaves)} (it adapts "
            f"{', '.join(sorted(ADAPTED[server]))} in Llama-family models)",
            "retrain without them, or merge into the base and serve the merged model",
        )
    ]


def _ranks(facts: AdapterFacts, server: str) -> list[Finding]:
    if server == "peft" or facts.peft_type != "LORA" or not facts.ranks:
        return []
    out = []
    ranks = set(facts.ranks.values())
    patterns = facts.config.get("rank_pattern") or facts.config.get("alpha_pattern")
    if len(ranks) > 1 or patterns or ranks != {facts.config.get("r")}:
        out.append(
            Finding(
                "ranks",
                "fixable",
                f"per-module ranks or scales differ ({sorted(ranks)}, rank_pattern / "
                f"alpha_pattern); {server} applies one lora_alpha / r to every module",
                f"pad every module to rank {max(ranks)} (zero rows and columns) and fold each "
                "module's scale into its B: exact; `--fix --out NEW_DIR`",
            )
        )
    top = max(ranks)
    if server == "vllm" and top > VLLM_RANKS[-1]:
        out.append(Finding("rank", "blocks", f"rank {top} is above vLLM's largest rank (512)"))
    elif server == "vllm" and top > VLLM_DEFAULT_RANK:
        cap = next(r for r in VLLM_RANKS if r >= top)
        out.append(
            Finding(
                "rank",
                "option",
                f"rank {top} is above vLLM's default --max-lora-rank ({VLLM_DEFAULT_RANK})",
                f"start vLLM with --max-lora-rank {cap}",
            )
        )
    return out


RULES = (_method, _dora, _saved_modules, _bias, _targets, _ranks)


def check_adapter(facts: AdapterFacts, server: str) -> list[Finding]:
    """Every finding of every rule for `server` (an empty list: it loads as it is)."""
    if server not in SERVERS:
        raise ExportInputError(f"--check {server!r}: choose one of {', '.join(SERVERS)}")
    return [finding for rule in RULES for finding in rule(facts, server)]
