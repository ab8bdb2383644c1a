"""What a run changed: a Hugging Face model card and a machine-readable record.

An adapter is an exact, inspectable diff of a base model. The record (`tilpass_record.json`)
pins that diff down with hashes: of the base weights, of the adapter file and of every data
file, next to the resolved config, the metrics before and after, and the software versions.
It is what a user shows an auditor who asks what was changed in a model. A full fine-tuning
run (the baseline) changes every weight; its card and record describe a complete model.
"""

from __future__ import annotations

import json
import platform
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from tilpass.adapter_files import WEIGHTS_NAME, atomic_write_bytes, file_sha256
from tilpass.json_files import dumps_strict

RECORD_NAME = "tilpass_record.json"
CARD_NAME = "README.md"


@dataclass
class ChangeRecord:
    """Everything the card and the record say about one trained adapter or fine-tuned model.

    Attributes:
        method: the method's registry name ("lora"), or "full fine-tuning".
        full_model: True when every parameter was trained and the whole model is saved.
        config: the saved `adapter_config.json`, or the full model's `config.json`.
        settings: the adapter settings that differ from its method's defaults (for the card).
        weights_files: the saved weight files, hashed into the record.
        base_weights_note: where the base weights came from, when that is not the original
            release (the default model's are de-quantized from a GGUF file).
        base_quantization: how the base was quantized for training (QLoRA), or None.
        base_weights_files: each base weight file's SHA-256 (name -> hash), when known, so a
            check can name the file that changed; `base_weights_sha256` is their manifest hash.
        provenance: how the record came about, when not by a tilpass training run.
        method_report: the method's own report on the trained adapter (AdaLoRA's ranks).
    """

    base_model: str
    base_weights_sha256: str | None
    method: str
    trainable_parameters: int
    total_parameters: int
    full_model: bool = False
    config: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    weights_files: list[str] = field(default_factory=lambda: [WEIGHTS_NAME])
    data_files: dict[str, str] = field(default_factory=dict)  # path -> sha256
    metrics_before: dict[str, float] = field(default_factory=dict)
    metrics_after: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    tokens: int = 0
    wall_time_s: float = 0.0
    run_config: dict[str, Any] = field(default_factory=dict)
    task: str | None = None
    base_weights_note: str | None = None
    base_quantization: dict[str, Any] | None = None
    base_weights_files: dict[str, str] = field(default_factory=dict)
    provenance: str | None = None
    method_report: list[str] = field(default_factory=list)  # Markdown from `Method.report`


def versions() -> dict[str, str]:
    """Versions of the packages that decide what the adapter computes."""
    out = {"python": platform.python_version()}
    for package in ("tilpass", "torch", "transformers", "safetensors", "peft"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return out


def hash_files(paths: list[str | Path]) -> dict[str, str]:
    """SHA-256 of each file (directories: of each file inside, sorted)."""
    out: dict[str, str] = {}
    for path in map(Path, paths):
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            out[str(file)] = file_sha256(file)
    return out


def write_record(directory: str | Path, change: ChangeRecord) -> Path:
    """Write `tilpass_record.json` beside the saved weights (atomically).

    An adapter is described under "adapter" (its file, hash and `adapter_config.json`); a
    fully fine-tuned model under "model" (each weight file with its hash, and `config.json`).
    """
    directory = Path(directory)
    files = [{"file": f, "sha256": file_sha256(directory / f)} for f in change.weights_files]
    counts = {
        "trainable_parameters": change.trainable_parameters,
        "total_parameters": change.total_parameters,
    }
    if change.full_model:
        saved = {"model": {"method": change.method, "files": files, "config": change.config}}
    else:
        (only,) = files  # an adapter is one weights file
        saved = {"adapter": {"method": change.method, **only, "config": change.config}}
    next(iter(saved.values())).update(counts)
    record = {
        "format": "tilpass-change-record/1",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "base_model": {
            "name_or_path": change.base_model,
            "sha256": change.base_weights_sha256,
            "quantization": change.base_quantization,
            **({"note": change.base_weights_note} if change.base_weights_note else {}),
            **(
                {"files": _file_entries(change.base_weights_files)}
                if change.base_weights_files
                else {}
            ),
        },
        **saved,
        "data": [{"path": p, "sha256": h} for p, h in sorted(change.data_files.items())],
        "metrics": {"before": change.metrics_before, "after": change.metrics_after},
        "training": {
            "steps": change.steps,
            "tokens": change.tokens,
            "wall_time_s": round(change.wall_time_s, 2),
            "config": change.run_config,
        },
        "task": change.task,
        "versions": versions(),
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0]},
        **({"provenance": change.provenance} if change.provenance else {}),
    }
    path = directory / RECORD_NAME
    atomic_write_bytes(path, (dumps_strict(record, indent=2, sort_keys=False) + "\n").encode())
    return path


def _file_entries(hashes: dict[str, str]) -> list[dict[str, str]]:
    return [{"file": name, "sha256": digest} for name, digest in sorted(hashes.items())]


def _metric_rows(before: dict[str, float], after: dict[str, float], trained: str) -> list[str]:
    rows = [f"| metric | base model | {trained} |", "| --- | --- | --- |"]
    for key in sorted(set(before) | set(after)):
        rows.append(f"| {key} | {_fmt(before.get(key))} | {_fmt(after.get(key))} |")
    return rows


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _header(change: ChangeRecord) -> list[str]:
    """The card's YAML metadata (what the Hugging Face Hub reads)."""
    if change.full_model:
        kind = ["library_name: transformers", "base_model_relation: finetune"]
        tags = ["- tilpass", "- full-fine-tuning"]
    else:
        kind = ["library_name: peft"]
        tags = ["- tilpass", f"- {change.method}", "- peft"]
    return ["---", f"base_model: {change.base_model}", *kind, "tags:", *tags, "---"]


def _what_changed(change: ChangeRecord) -> list[str]:
    """The method, its settings and how many parameters it changed."""
    total, trained = change.total_parameters, change.trainable_parameters
    if change.full_model:
        share = "all of them" if trained == total else f"{100 * trained / max(total, 1):.4f}%"
        return [
            "## What was changed",
            "",
            "- method: full fine-tuning (every weight of the base model was trained)",
            f"- changed parameters: {trained:,d} of {total:,d} ({share})",
        ]
    peft_type = change.config.get("peft_type", change.method.upper())
    settings = [f"  - `{key}`: {value!r}" for key, value in change.settings.items()]
    return [
        "## What was adapted",
        "",
        f"- method: {change.method} (PEFT type {peft_type})",
        f"- settings other than {change.method}'s defaults:"
        if settings
        else f"- settings: all of {change.method}'s defaults",
        *settings,
        f"- trainable parameters: {trained:,d} of {total:,d} "
        f"({100 * trained / max(total, 1):.4f}%); the base model's weights are unchanged",
        *_quantized_base(change),
    ]


def _quantized_base(change: ChangeRecord) -> list[str]:
    """The card's line about a base that was quantized for training (QLoRA)."""
    if change.base_quantization is None:
        return []
    return [
        f"- base model during training: {change.base_quantization['description']} "
        "(bitsandbytes); the adapter is an ordinary LoRA file and also loads onto the "
        "full-precision base",
    ]


def _how_to_load(change: ChangeRecord, location: str) -> list[str]:
    if change.full_model:
        return [
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{location}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{location}")',
            "```",
            "",
            "The directory is a complete model in the Hugging Face layout (weights, config and "
            "tokenizer); it does not need the base model. `tilpass_record.json` holds the hashes "
            "and the full configuration.",
        ]
    return [
        "```python",
        "from transformers import AutoModelForCausalLM",
        "from tilpass import AdaptedModel",
        "",
        'base = AutoModelForCausalLM.from_pretrained("<base model directory>")',
        f'model = AdaptedModel.from_pretrained(base, "{location}")',
        "```",
        "",
        "The directory is in the Hugging Face PEFT layout, so `peft.PeftModel.from_pretrained`"
        " reads it too. `tilpass_record.json` holds the hashes and the full configuration.",
    ]


def render_card(change: ChangeRecord, location: str | Path) -> str:
    """The model card's text; `location` is the directory named in the loading example."""
    if change.full_model:
        title = f"# Full fine-tuning of {change.base_model}"
    else:
        title = f"# {change.method} adapter for {change.base_model}"
    body = [
        title,
        "",
        f"Trained with tilpass{f' on the task: {change.task}' if change.task else ''}.",
        "",
        *_what_changed(change),
        f"- base weights SHA-256: `{change.base_weights_sha256}`",
        *([f"- note: {change.base_weights_note}"] if change.base_weights_note else []),
        *change.method_report,
        "",
        "## Data",
        "",
        *[f"- `{p}` (SHA-256 `{h[:16]}…`)" for p, h in sorted(change.data_files.items())],
        "",
        "## Results (held-out split, measured before and after training)",
        "",
        *_metric_rows(
            change.metrics_before,
            change.metrics_after,
            "fine-tuned" if change.full_model else "with adapter",
        ),
        "",
        f"Training: {change.steps} steps, {change.tokens:,d} tokens, {change.wall_time_s:.0f} s.",
        "",
        "## How to load",
        "",
        *_how_to_load(change, str(location)),
        "",
    ]
    return "\n".join(_header(change) + body)


def write_card(
    directory: str | Path, change: ChangeRecord, location: str | Path | None = None
) -> Path:
    """Write the model card (`README.md` with a YAML header) into `directory`, atomically.

    `location` is the path the loading example names (default: `directory`); a run writes the
    card into a staging directory that is renamed to `location` afterwards.
    """
    directory = Path(directory)
    path = directory / CARD_NAME
    atomic_write_bytes(path, render_card(change, location or directory).encode())
    return path


def base_model_warning(adapter_dir: str | Path, model: str) -> str | None:
    """A warning when `model` is not the base model `adapter_dir` was trained on, else None.

    The record's hash of the base weights decides (two models of the same shapes load the
    adapter equally well, and only one gives the outputs the record measured); an adapter
    without a record is compared by the base model name in its `adapter_config.json`.
    """
    from tilpass.pretrained import DEFAULT_MODEL_ALIASES, known_weights_sha256

    directory = Path(adapter_dir)
    recorded = _recorded_base(directory)
    if recorded.get("sha256"):
        actual = known_weights_sha256(model)
        if actual == recorded["sha256"]:
            return None
        return (
            f"warning: {directory} was trained on base model {recorded.get('name_or_path')} "
            f"(weights SHA-256 {recorded['sha256'][:16]}…), but {model} has other weights "
            f"(SHA-256 {actual[:16]}…): the adapter loads, but its outputs are not the ones "
            f"its {RECORD_NAME} measured"
        )
    named = recorded.get("name_or_path")
    same = {named, model} <= set(DEFAULT_MODEL_ALIASES) or named in (None, "", model)
    if same:
        return None
    return f"warning: {directory} names base model {named}, but the model loaded is {model}"


def _recorded_base(directory: Path) -> dict[str, Any]:
    """The base model an adapter directory records: its record's entry, else its config's."""
    for name, read in (
        (RECORD_NAME, lambda data: data["base_model"]),
        ("adapter_config.json", lambda data: {"name_or_path": data["base_model_name_or_path"]}),
    ):
        path = directory / name
        if path.is_file():
            try:
                found = read(json.loads(path.read_text()))
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if isinstance(found, dict):
                return found
    return {}


def adapter_card(config: Any, base_model: str | None) -> str:
    """The short model card `save_pretrained` writes beside an adapter (PEFT's metadata:
    `library_name: peft`, the base model when known, the method's tag)."""
    method = str(getattr(config, "PEFT_TYPE", "")).lower()
    header = ["---", "library_name: peft"]
    if base_model:
        header.append(f"base_model: {base_model}")
    header += ["tags:", *[f"- {t}" for t in sorted({method, "tilpass"} - {""})], "---"]
    body = [
        "",
        f"# {method or 'adapter'} adapter" + (f" for {base_model}" if base_model else ""),
        "",
        "Saved by tilpass in the Hugging Face PEFT layout (`adapter_config.json` and the adapter "
        "tensors); `peft.PeftModel.from_pretrained` and `tilpass.AdaptedModel.from_pretrained` "
        "both load it.",
        "",
    ]
    return "\n".join(header + body)
