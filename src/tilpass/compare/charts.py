"""The comparison's PNG charts: quality against trainable parameters, inference overhead,
training peak memory. Each is drawn from the table rows; rows without the number are left out.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

QUALITY_CHART = "quality_vs_params.png"
OVERHEAD_CHART = "inference_overhead.png"
MEMORY_CHART = "peak_memory.png"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    """Write the figure to a temporary name, then rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    return path


def quality_chart(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Held-out quality (exact match, else loss) against trainable parameters, log scale."""
    use_match = any(r.get("exact_match") is not None for r in rows)
    key, label = ("exact_match", "exact match") if use_match else ("eval_loss", "held-out loss")
    points = [
        r
        for r in rows
        if r.get(key) is not None and r.get("trainable_params") and not r.get("merged")
    ]
    if not points:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in points:
        ax.scatter(r["trainable_params"], r[key])
        ax.annotate(
            r["method"],
            (r["trainable_params"], r[key]),
            fontsize=8,
            xytext=(4, 3),
            textcoords="offset points",
        )
    base = next((r for r in rows if r["method"] == "base model" and r.get(key) is not None), None)
    if base is not None:
        ax.axhline(base[key], color="grey", linestyle="--", label="base model")
        ax.legend()
    ax.set_xscale("log")
    ax.set(xlabel="trainable parameters", ylabel=label, title=f"{label} vs trainable parameters")
    path = _save(fig, path)
    plt.close(fig)
    return path


def overhead_chart(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Decode (batch 1 and 8) and prefill latency as ratios to the base model, per row."""
    keys = (
        ("decode_b1_x", "decode b1"),
        ("decode_b8_x", "decode b8"),
        ("prefill_128_x", "prefill 128"),
    )
    shown = [r for r in rows if any(r.get(k) is not None for k, _ in keys)]
    if not shown:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(7, 0.8 * len(shown)), 4.5))
    width = 0.8 / len(keys)
    for i, (key, name) in enumerate(keys):
        xs = [j + i * width for j in range(len(shown))]
        ax.bar(xs, [r.get(key) or 0 for r in shown], width, label=name)
    ax.axhline(1.0, color="grey", linestyle="--")
    ax.set_xticks(
        [j + width for j in range(len(shown))],
        [r["method"] for r in shown],
        rotation=30,
        ha="right",
        fontsize=8,
    )
    ax.set(ylabel="latency / base model", title="inference overhead (1.0 = base model)")
    ax.legend()
    path = _save(fig, path)
    plt.close(fig)
    return path


def memory_chart(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Training peak memory per method."""
    shown = [r for r in rows if r.get("train_peak_mb") is not None and not r.get("merged")]
    if not shown:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(7, 0.7 * len(shown)), 4.5))
    ax.bar([r["method"] for r in shown], [r["train_peak_mb"] for r in shown])
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    ax.set(ylabel="MB", title="training peak memory")
    path = _save(fig, path)
    plt.close(fig)
    return path


def draw_charts(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """Every chart that the rows have numbers for, written into `out`."""
    drawn = [
        quality_chart(rows, out / QUALITY_CHART),
        overhead_chart(rows, out / OVERHEAD_CHART),
        memory_chart(rows, out / MEMORY_CHART),
    ]
    return [p for p in drawn if p is not None]
