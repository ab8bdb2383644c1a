"""`tilpass card --format md|html|pdf`: one document a reviewer reads about a change.

It gathers the change record (`tilpass_record.json`), the adapter's structure (as `tilpass
inspect` reads it from the files), the evaluation before and after, the data sources with their
hashes, the compute used and the model card, under headings that follow the technical
documentation items of the EU AI Act where they apply (general description and intended
purpose, design of the change, training data, evaluation, limitations). The document says
that it is not a statement of legal compliance. Rendering is in `card_render.py`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tilpass.card import CARD_NAME, RECORD_NAME
from tilpass.card_render import Block, render
from tilpass.verify import read_record

DISCLAIMER = (
    "The headings follow the technical documentation items of the EU AI Act (Annex IV) where "
    "they apply to a modification of a model. This document describes the change; it is not "
    "a statement of legal compliance."
)


def _metrics(record: dict[str, Any]) -> list[Block]:
    before = record.get("metrics", {}).get("before", {}) or {}
    after = record.get("metrics", {}).get("after", {}) or {}
    keys = sorted(k for k in set(before) | set(after) if k != "examples")
    if not keys:
        return [Block("p", "No evaluation was recorded for this change.")]
    rows = [[k, _number(before.get(k)), _number(after.get(k))] for k in keys]
    return [
        Block("p", "Held-out split, measured on the base model and on the changed model:"),
        Block("table", rows=[["metric", "before (base model)", "after (with the change)"], *rows]),
    ]


def _number(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _general(record: dict[str, Any], saved: dict[str, Any]) -> list[Block]:
    base = record["base_model"]
    purpose = record.get("task") or "not stated in the record (give it with --task when recording)"
    items = [
        f"intended purpose: {purpose}",
        f"base model: {base.get('name_or_path')}",
        f"method: {saved.get('method')}",
        f"record created: {record.get('created', '-')}",
    ]
    if record.get("provenance"):
        items.append(f"provenance: {record['provenance']}")
    return [Block("ul", items=items)]


def _design(directory: Path, record: dict[str, Any], saved: dict[str, Any]) -> list[Block]:
    trained, total = saved.get("trainable_parameters", 0), saved.get("total_parameters", 0)
    share = f" ({100 * trained / total:.4f}% of {total:,d})" if total else ""
    items = [f"changed (trainable) parameters: {trained:,d}{share}"]
    quantization = record["base_model"].get("quantization")
    if quantization:
        items.append(f"base quantized during training: {quantization.get('description')}")
    blocks = [Block("ul", items=items)]
    if "adapter" in record:
        blocks += _structure(directory)
    config = {k: v for k, v in saved.get("config", {}).items() if v not in (None, {}, [])}
    blocks += [
        Block("p", "Configuration as saved (fields that are null or empty left out):"),
        Block("code", json.dumps(config, indent=2)),
    ]
    return blocks


def _structure(directory: Path) -> list[Block]:
    from tilpass.inspect_adapter import describe_adapter, layer_span, rank_summary

    report = describe_adapter(directory)
    kinds: dict[str, list[Any]] = {}
    for module in report.modules:
        kinds.setdefault(module.kind if module.path else "model inputs", []).append(module)
    rows = [["module kind", "modules", "layers", "rank / size", "parameters"]]
    for kind, modules in kinds.items():
        params = f"{sum(m.parameters for m in modules):,d}"
        rows.append([kind, str(len(modules)), layer_span(modules), rank_summary(modules), params])
    blocks = [
        Block("p", "Adapted modules (read from the adapter file):"),
        Block("table", rows=rows),
    ]
    if report.virtual_tokens is not None:
        blocks.append(Block("p", f"Adds {report.virtual_tokens} virtual tokens before each input."))
    return blocks


def _data(record: dict[str, Any]) -> list[Block]:
    entries = record.get("data", [])
    if not entries:
        return [Block("p", "No data files were recorded.")]
    rows = [["file", "SHA-256"], *[[e["path"], e["sha256"]] for e in entries]]
    return [Block("table", rows=rows)]


def _compute(record: dict[str, Any]) -> list[Block]:
    training = record.get("training", {})
    versions = ", ".join(f"{k} {v}" for k, v in record.get("versions", {}).items())
    return [
        Block(
            "ul",
            items=[
                f"optimizer steps: {training.get('steps', '-')}",
                f"training tokens: {training.get('tokens', '-'):,}"
                if isinstance(training.get("tokens"), int)
                else "training tokens: -",
                f"wall time: {training.get('wall_time_s', '-')} s",
                f"machine: {record.get('machine', {}).get('platform', '-')}",
                f"software: {versions or '-'}",
            ],
        )
    ]


def _limitations(record: dict[str, Any]) -> list[Block]:
    items = [
        "The change inherits the capabilities and limitations of the base model; it was "
        "evaluated only on the held-out data listed above, and results elsewhere may differ.",
    ]
    note = record["base_model"].get("note")
    if note:
        items.append(f"Base weights: {note}.")
    if not record.get("metrics", {}).get("after"):
        items.append("No evaluation after the change was recorded.")
    return [Block("ul", items=items)]


def _integrity(directory: Path, record: dict[str, Any]) -> list[Block]:
    base = record["base_model"]
    rows = [
        ["item", "SHA-256"],
        [f"base model {base.get('name_or_path')}", str(base.get("sha256"))],
    ]
    if "adapter" in record:
        rows.append([record["adapter"]["file"], record["adapter"]["sha256"]])
    else:
        rows += [[f["file"], f["sha256"]] for f in record["model"]["files"]]
    how = f"tilpass verify {directory} --base MODEL --data FILE ..."
    return [Block("table", rows=rows), Block("p", f"Recompute every hash with: {how}")]


def _model_card(directory: Path) -> list[Block]:
    path = directory / CARD_NAME
    if not path.is_file():
        return [Block("p", f"No {CARD_NAME} in the directory.")]
    text = path.read_text()
    if text.startswith("---\n") and "\n---\n" in text[4:]:
        text = text[4:].split("\n---\n", 1)[1]  # drop the YAML metadata
    return [Block("code", text.strip())]


def build_document(directory: Path) -> list[Block]:
    """The documentation of the change saved in `directory`, as blocks."""
    record = read_record(directory)
    saved = record.get("adapter") or record["model"]
    base = record["base_model"].get("name_or_path")
    return [
        Block("h1", f"Change documentation: {saved.get('method')} on {base}"),
        Block("p", DISCLAIMER),
        Block("h2", "1. General description and intended purpose"),
        *_general(record, saved),
        Block("h2", "2. Design of the change"),
        *_design(directory, record, saved),
        Block("h2", "3. Training data"),
        *_data(record),
        Block("h2", "4. Evaluation"),
        *_metrics(record),
        Block("h2", "5. Compute used"),
        *_compute(record),
        Block("h2", "6. Limitations"),
        *_limitations(record),
        Block("h2", "7. Integrity"),
        *_integrity(directory, record),
        Block("h2", f"Appendix: model card ({CARD_NAME})"),
        *_model_card(directory),
        Block("h2", f"Appendix: training configuration ({RECORD_NAME})"),
        Block("code", json.dumps(record.get("training", {}).get("config", {}), indent=2)),
    ]


def write_bundle(directory: Path, out: Path, fmt: str) -> Path:
    """Render the documentation of `directory` as `fmt` (md, html, pdf) into `out`."""
    from tilpass.adapter_files import atomic_write_bytes

    data = render(build_document(directory), fmt)  # before anything is written
    atomic_write_bytes(out, data)
    return out
