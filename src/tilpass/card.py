"""What an adapter changed: a Hugging Face model card and a machine-readable record.

An adapter is an exact, inspectable diff of a base model. The record (`tilpass_record.json`)
pins that diff down with hashes: of the base weights, of the adapter file and of every data
file, next to the resolved config, the metrics before and after, and the software versions.
It is what a user shows an auditor who asks what was changed in a model.
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

RECORD_NAME = "tilpass_record.json"
CARD_NAME = "README.md"


@dataclass
class ChangeRecord:
    """Everything the card and the record say about one trained adapter."""

    base_model: str
    base_weights_sha256: str | None
    method: str
    adapter_config: dict[str, Any]
    trainable_parameters: int
    total_parameters: int
    data_files: dict[str, str] = field(default_factory=dict)  # path -> sha256
    metrics_before: dict[str, float] = field(default_factory=dict)
    metrics_after: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    tokens: int = 0
    wall_time_s: float = 0.0
    run_config: dict[str, Any] = field(default_factory=dict)
    task: str | None = None


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


def write_record(
    adapter_dir: str | Path, change: ChangeRecord, weights_file: str = WEIGHTS_NAME
) -> Path:
    """Write `tilpass_record.json` beside the adapter files (atomically)."""
    adapter_dir = Path(adapter_dir)
    record = {
        "format": "tilpass-change-record/1",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "base_model": {"name_or_path": change.base_model, "sha256": change.base_weights_sha256},
        "adapter": {
            "method": change.method,
            "file": weights_file,
            "sha256": file_sha256(adapter_dir / weights_file),
            "config": change.adapter_config,
            "trainable_parameters": change.trainable_parameters,
            "total_parameters": change.total_parameters,
        },
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
    }
    path = adapter_dir / RECORD_NAME
    atomic_write_bytes(path, (json.dumps(record, indent=2, sort_keys=False) + "\n").encode())
    return path


def _metric_rows(before: dict[str, float], after: dict[str, float]) -> list[str]:
    rows = ["| metric | base model | with adapter |", "| --- | --- | --- |"]
    for key in sorted(set(before) | set(after)):
        rows.append(f"| {key} | {_fmt(before.get(key))} | {_fmt(after.get(key))} |")
    return rows


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def write_card(adapter_dir: str | Path, change: ChangeRecord) -> Path:
    """Write a Hugging Face model card (`README.md` with a YAML header) for the adapter."""
    adapter_dir = Path(adapter_dir)
    config = change.adapter_config
    targets = config.get("target_modules")
    header = [
        "---",
        f"base_model: {change.base_model}",
        "library_name: peft",
        "tags:",
        "- tilpass",
        f"- {change.method.lower()}",
        "- peft",
        "---",
    ]
    share = 100 * change.trainable_parameters / max(change.total_parameters, 1)
    body = [
        f"# {change.method} adapter for {change.base_model}",
        "",
        f"Trained with tilpass{f' on the task: {change.task}' if change.task else ''}.",
        "",
        "## What was adapted",
        "",
        f"- method: {change.method}, rank r={config.get('r')}, "
        f"lora_alpha={config.get('lora_alpha')}, dropout={config.get('lora_dropout')}, "
        f"rsLoRA={config.get('use_rslora')}, "
        f"DoRA={config.get('use_dora')}",
        f"- target modules: {targets}",
        f"- trainable parameters: {change.trainable_parameters:,d} of "
        f"{change.total_parameters:,d} ({share:.4f}%)",
        f"- base weights SHA-256: `{change.base_weights_sha256}`",
        "",
        "## Data",
        "",
        *[f"- `{p}` (SHA-256 `{h[:16]}…`)" for p, h in sorted(change.data_files.items())],
        "",
        "## Results (held-out split, measured before and after training)",
        "",
        *_metric_rows(change.metrics_before, change.metrics_after),
        "",
        f"Training: {change.steps} steps, {change.tokens:,d} tokens, {change.wall_time_s:.0f} s.",
        "",
        "## How to load",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM",
        "from tilpass import AdaptedModel",
        "",
        'base = AutoModelForCausalLM.from_pretrained("<base model directory>")',
        f'model = AdaptedModel.from_pretrained(base, "{adapter_dir}")',
        "```",
        "",
        "The directory is in the Hugging Face PEFT layout, so `peft.PeftModel.from_pretrained`"
        " reads it too. `tilpass_record.json` holds the hashes and the full configuration.",
        "",
    ]
    path = adapter_dir / CARD_NAME
    atomic_write_bytes(path, "\n".join(header + body).encode())
    return path
