"""Recommendations per use case, computed from the measured table rows (never fixed text).

- One task: the best held-out quality; merged when a merged row of that method exists (no
  inference overhead), with its measured decode ratio.
- Many tasks on one server: adapters served unmerged side by side on one base, so the best
  quality among the adapter rows (full fine-tuning and merged rows excluded), with its file
  size per task and its decode overhead at batch 8.
- Tight memory: the lowest training peak memory among the rows that reach at least half the
  best row's quality (a method that barely learned within the budget is no answer, however
  little memory it takes; the line names what it passed over), with the quality it gives up
  against the best row.

Quality is exact match on the held-out split when measured, the held-out loss breaking ties
(or alone when there is no exact match).
"""

from __future__ import annotations

import math
from typing import Any


def _quality(row: dict[str, Any]) -> tuple[float, float]:
    match = row.get("exact_match")
    loss = row.get("eval_loss")
    return (
        match if match is not None else -math.inf,
        -loss if loss is not None and math.isfinite(loss) else -math.inf,
    )


def _describe(row: dict[str, Any]) -> str:
    parts = []
    if row.get("exact_match") is not None:
        parts.append(f"exact match {100 * row['exact_match']:.1f}%")
    if row.get("eval_loss") is not None:
        parts.append(f"held-out loss {row['eval_loss']:.3f}")
    return ", ".join(parts) or "no quality measured"


def _ratio(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    return f"{value:.2f}x the base" if value is not None else "not measured"


def _mb(value: float | None) -> str:
    if value is None:
        return "size not measured"
    return f"{value:,.0f} MB" if value >= 10 else f"{value:.3g} MB"


def _trained(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        r
        for r in rows
        if r["status"] == "ok" and r["method"] != "base model" and not r.get("merged")
    ]


def one_task(rows: list[dict[str, Any]]) -> str | None:
    """The best quality; merged if that method was measured merged."""
    trained = _trained(rows)
    if not trained:
        return None
    best = max(trained, key=_quality)
    merged = next((r for r in rows if r["method"] == f"{best['method']} (merged)"), None)
    shown = merged or best
    how = f"{best['method']}, merged into the base" if merged else best["method"]
    return f"One task: {how} ({_describe(best)}; decode at batch 1 {_ratio(shown, 'decode_b1_x')})."


def many_tasks(rows: list[dict[str, Any]]) -> str | None:
    """The best adapter kept unmerged: many of them share one base model in memory."""
    adapters = [r for r in _trained(rows) if r["method"] != "full"]
    if not adapters:
        return None
    best = max(adapters, key=lambda r: (_quality(r), -(r.get("file_bytes") or 0)))
    full = next((r for r in _trained(rows) if r["method"] == "full"), None)
    size = f"{_mb(best.get('file_mb'))} per task"
    if full is not None and full.get("file_mb"):
        size += f" against {_mb(full['file_mb'])} for a fully fine-tuned copy"
    return (
        f"Many tasks on one server: {best['method']} adapters on one shared base "
        f"({_describe(best)}; {size}; decode at batch 8 {_ratio(best, 'decode_b8_x')}, unmerged)."
    )


USABLE_SHARE = 0.5
"""A tight-memory pick must reach this share of the best row's quality (exact match, or the
best held-out loss divided by its own)."""


def _usable(row: dict[str, Any], best: dict[str, Any]) -> bool:
    """Whether `row` reaches `USABLE_SHARE` of `best`'s quality."""
    match, top = row.get("exact_match"), best.get("exact_match")
    if match is not None and top:
        return match >= USABLE_SHARE * top
    loss, low = row.get("eval_loss"), best.get("eval_loss")
    if loss is None or low is None or not math.isfinite(loss):
        return loss is None
    return low >= USABLE_SHARE * loss


def tight_memory(rows: list[dict[str, Any]]) -> str | None:
    """The lowest training peak memory among usable rows, and how its quality compares with
    the best row's; rows that use less memory but did not learn enough are named."""
    measured = [r for r in _trained(rows) if r.get("train_peak_mb") is not None]
    if not measured:
        return None
    best = max(measured, key=_quality)
    usable = [r for r in measured if _usable(r, best)]
    low = min(usable, key=lambda r: (r["train_peak_mb"], tuple(-q for q in _quality(r))))
    against = (
        "also the best quality"
        if best is low
        else f"{best['method']}, the best, gives {_describe(best)} at "
        f"{best['train_peak_mb']:,.0f} MB"
    )
    skipped = [r["method"] for r in measured if r not in usable
               and r["train_peak_mb"] < low["train_peak_mb"]]  # fmt: skip
    passed_over = (
        f"; {', '.join(skipped)} took less memory but reached under "
        f"{USABLE_SHARE:.0%} of the best quality"
        if skipped
        else ""
    )
    return (
        f"Tight memory: {low['method']} (training peak {low['train_peak_mb']:,.0f} MB; "
        f"{_describe(low)}; {against}{passed_over})."
    )


def recommendations(rows: list[dict[str, Any]]) -> list[str]:
    """One line per use case that the measured rows can answer."""
    lines = [one_task(rows), many_tasks(rows), tight_memory(rows)]
    return [line for line in lines if line is not None]
