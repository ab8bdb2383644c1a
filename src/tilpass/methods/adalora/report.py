"""The final rank of each module after AdaLoRA's allocation: a small table and a figure.

Modules are arranged by layer index (the first number in the module path) and module kind
(the last path component: q_proj, v_proj, ...), which is how the budget usually differs.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from tilpass.methods.adalora.layer import AdaLoraLinear
from tilpass.methods.adalora.training import adalora_layers
from tilpass.methods.registry import MethodReport

FIGURE_NAME = "adalora_ranks.png"


def rank_grid(ranks: dict[str, int]) -> tuple[list[str], list[str], dict[tuple[str, str], int]]:
    """(layer labels, module kinds, {(layer, kind): rank}) from {module path: rank}."""
    grid: dict[tuple[str, str], int] = {}
    for path, rank in ranks.items():
        number = re.search(r"(?:^|\.)(\d+)(?:\.|$)", path)
        cell = (number.group(1) if number else "-", path.rsplit(".", 1)[-1])
        grid[cell] = grid.get(cell, 0) + rank
    layers = sorted({key[0] for key in grid}, key=lambda s: int(s) if s.isdigit() else -1)
    kinds = sorted({key[1] for key in grid})
    return layers, kinds, grid


def rank_table(ranks: dict[str, int], init_r: int, target_r: int) -> list[str]:
    """A Markdown table: one row per layer, one column per module kind, then the totals."""
    layers, kinds, grid = rank_grid(ranks)
    lines = [
        "| layer | " + " | ".join(kinds) + " |",
        "|---|" + "---|" * len(kinds),
    ]
    for layer in layers:
        cells = [str(grid[layer, kind]) if (layer, kind) in grid else "" for kind in kinds]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    kept = sum(ranks.values())
    lines += [
        "",
        f"kept rank {kept} of {init_r * len(ranks)} (init_r {init_r} x {len(ranks)} modules); "
        f"target budget {target_r * len(ranks)} (target_r {target_r}); "
        f"ranks from {min(ranks.values(), default=0)} to {max(ranks.values(), default=0)}",
    ]
    return lines


def rank_figure(ranks: dict[str, int], title: str) -> Any:
    """A matplotlib figure (Agg): rank by layer, one line per module kind."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    layers, kinds, grid = rank_grid(ranks)
    figure = Figure(figsize=(max(4.0, 0.35 * len(layers) + 2), 3.2))
    axes = figure.add_subplot()
    positions = list(range(len(layers)))
    for kind in kinds:
        points = [(x, grid[layer, kind]) for x, layer in enumerate(layers) if (layer, kind) in grid]
        axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=kind)
    axes.set_xticks(positions, layers, fontsize=7)
    axes.set_xlabel("layer")
    axes.set_ylabel("kept rank")
    axes.set_title(title, fontsize=9)
    axes.legend(fontsize=7, ncols=min(len(kinds), 4))
    figure.tight_layout()
    return figure


def report(model: nn.Module, adapter_name: str) -> MethodReport | None:
    """The registry's `report`: final ranks per module of adapter `adapter_name`."""
    layers = adalora_layers(model, adapter_name)
    if not layers:
        return None
    config = model.peft_config[adapter_name]
    ranks = {path: layer.kept_rank(adapter_name) for path, layer in layers}
    title = f"AdaLoRA final ranks ({adapter_name})"
    assert all(isinstance(layer, AdaLoraLinear) for _, layer in layers)
    return MethodReport(
        title=title,
        lines=rank_table(ranks, config.init_r, config.target_r),
        figure=rank_figure(ranks, title),
        figure_name=FIGURE_NAME,
    )
