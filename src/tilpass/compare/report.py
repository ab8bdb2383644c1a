"""The comparison's table: rows from the children's results, printed, as Markdown and CSV.

`table_rows` turns the children's results into the rows of the table: the base model first,
then each method, and for a method measured merged too (LoRA, DoRA) a second row with the
merged model's inference numbers. Latencies are ratios to the base model's row, measured in
the same run. Numbers that a row lacks (a failed method, the base model's training) are
empty, never zero.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

LATENCIES = ("decode_b1_ms", "decode_b8_ms", "prefill_128_ms")


@dataclass(frozen=True)
class Column:
    """One column: its key in a row, its header, and how the terminal / Markdown show it."""

    key: str
    header: str
    show: Callable[[Any], str]


def _count(v: Any) -> str:
    return f"{v:,d}"


def _pct(v: Any) -> str:
    return f"{v:.3f}%" if v < 1 else f"{v:.1f}%"


def _ratio(v: Any) -> str:
    return f"{v:.2f}x"


def _mb(v: Any) -> str:
    return f"{v:,.1f}"


def _float(v: Any) -> str:
    return f"{v:.3f}"


def _match(v: Any) -> str:
    return f"{100 * v:.1f}%"


COLUMNS = (
    Column("method", "method", str),
    Column("status", "status", str),
    Column("trainable_params", "trainable params", _count),
    Column("trainable_pct", "trainable % of base", _pct),
    Column("inference_params", "inference params", _count),
    Column("train_peak_mb", "train peak MB", _mb),
    Column("train_tokens_per_s", "train tokens/s", lambda v: f"{v:,.0f}"),
    Column("decode_b1_x", "decode b1 vs base", _ratio),
    Column("decode_b8_x", "decode b8 vs base", _ratio),
    Column("prefill_128_x", "prefill 128 vs base", _ratio),
    Column("file_mb", "file MB", lambda v: f"{v:,.2f}"),
    Column("eval_loss", "held-out loss", _float),
    Column("exact_match", "exact match", _match),
)
"""The table's columns, in order; the CSV has these keys and the raw latencies too."""

CSV_KEYS = [c.key for c in COLUMNS] + [*LATENCIES, "file_bytes", "train_steps", "error"]


def _flat(result: dict[str, Any], base: dict[str, Any] | None) -> dict[str, Any]:
    """One table row from one result (or its `merged` part), ratios against `base`."""
    row: dict[str, Any] = {"method": result["label"], "status": result["status"]}
    for key in ("trainable_params", "inference_params", "train_peak_mb", "train_tokens_per_s"):
        row[key] = result.get(key)
    row |= {k: result.get(k) for k in ("eval_loss", "exact_match", "file_bytes", "train_steps")}
    if "error" in result:
        row["error"] = result["error"]
    if result.get("file_bytes") is not None:
        row["file_mb"] = result["file_bytes"] / 2**20
    base_params = base.get("base_params") if base else None
    if row["trainable_params"] is not None and base_params:
        row["trainable_pct"] = 100 * row["trainable_params"] / base_params
    latency = result.get("latency") or {}
    base_latency = (base or {}).get("latency") or {}
    for key in LATENCIES:
        row[key] = latency.get(key)
        if latency.get(key) is not None and base_latency.get(key):
            row[key.replace("_ms", "_x")] = latency[key] / base_latency[key]
    return row


def table_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The table's rows: the base model's first, then each method (and its merged form)."""
    base = next((r for r in results if r["label"] == "base" and r["status"] == "ok"), None)
    rows = []
    for result in results:
        row = _flat(result, base)
        if result["label"] == "base":
            row["method"] = "base model"
        rows.append(row)
        if "merged" in result:
            merged = {**result, **result["merged"], "label": f"{result['label']} (merged)"}
            rows.append(_flat(merged, base) | {"merged": True})
    return rows


def _cells(row: dict[str, Any]) -> list[str]:
    return [c.show(row[c.key]) if row.get(c.key) is not None else "-" for c in COLUMNS]


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The table in GitHub Markdown; failed rows name their error below the table."""
    lines = ["| " + " | ".join(c.header for c in COLUMNS) + " |"]
    lines.append("|" + "|".join("---" if i < 2 else "---:" for i in range(len(COLUMNS))) + "|")
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in rows]
    errors = [f"- {row['method']}: {row['error']}" for row in rows if row.get("error")]
    return "\n".join(lines + (["", *errors] if errors else []))


def terminal_table(rows: list[dict[str, Any]]) -> str:
    """The table as aligned plain text for the terminal."""
    cells = [[c.header for c in COLUMNS]] + [_cells(row) for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    text = [
        "  ".join(
            cell.ljust(w) if i < 2 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in cells
    ]
    errors = [f"{row['method']}: {row['error']}" for row in rows if row.get("error")]
    return "\n".join(text + errors)


def csv_text(rows: list[dict[str, Any]]) -> str:
    """The table as CSV with raw numbers (no units, no rounding); empty cells where none."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_KEYS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in CSV_KEYS})
    return buffer.getvalue()
