"""What each trained adapter's method reports at the end of a run (`Method.report`).

The run prints the reports' lines, adds them to the model card and saves their figures beside
the adapter; which methods report anything (AdaLoRA's final ranks) is the registry's business.
"""

from __future__ import annotations

import io
from typing import Any

from tilpass.methods import MethodReport, method_of
from tilpass.model import AdaptedModel


def method_reports(model: Any) -> list[MethodReport]:
    """The reports of the model's active adapters whose methods have one (none for a model
    without adapters: full fine-tuning)."""
    if not isinstance(model, AdaptedModel):
        return []
    found = []
    for name in model.active_adapters:
        method = method_of(model.peft_config[name])
        made = method.report(model, name) if method.report is not None else None
        if made is not None:
            found.append(made)
    return found


def card_lines(reports: list[MethodReport]) -> list[str]:
    """The model card's sections: heading, lines, and the figure by its file name."""
    lines: list[str] = []
    for made in reports:
        lines += ["", f"## {made.title}", "", *made.lines]
        if made.figure is not None:
            lines += ["", f"![{made.title}]({made.figure_name})"]
    return lines


def figure_files(reports: list[MethodReport]) -> dict[str, bytes]:
    """{file name: PNG bytes} of the reports' figures."""
    files = {}
    for made in reports:
        if made.figure is not None:
            buffer = io.BytesIO()
            made.figure.savefig(buffer, format="png", dpi=120)
            files[made.figure_name] = buffer.getvalue()
    return files
