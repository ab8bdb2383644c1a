"""What `tilpass compare` writes and prints: the table (terminal, Markdown, CSV), the raw
results as JSON, the charts and the recommendations, all computed from the measured rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tilpass.adapter_files import atomic_write_bytes
from tilpass.compare.charts import draw_charts
from tilpass.compare.recommend import recommendations
from tilpass.compare.report import csv_text, markdown_table, table_rows, terminal_table
from tilpass.json_files import dumps_strict

NOTES = (
    "Latencies are ratios to the base model measured in the same run (decode step at batch 1 "
    "and 8 after a 16-token prompt, one 128-token prefill at batch 1). Peak memory is the "
    "training process's peak resident memory on a CPU, `torch.cuda.max_memory_allocated` on "
    "a GPU. File size is the adapter's safetensors file (the whole model's for full "
    "fine-tuning)."
)


def markdown_report(
    rows: list[dict[str, Any]], header: dict[str, Any], charts: list[Path], advice: list[str]
) -> str:
    """The whole Markdown report: how it was made, the table, the advice, the charts."""
    lines = [
        "# tilpass compare",
        "",
        f"- command: `{header['command']}`",
        f"- machine: {header['machine']}",
        f"- model: {header['model']}; budget: {header['budget']}",
        f"- data: train {header['data']['train']}, held-out {header['data']['eval']}",
        f"- wall time: {header['wall_s'] / 60:.1f} minutes",
        "",
        markdown_table(rows),
        "",
        NOTES,
        "",
        "## Recommendations (computed from the table)",
        "",
        *[f"- {line}" for line in advice],
        "",
        *[f"![{path.stem}]({path.name})" for path in charts],
    ]
    return "\n".join(lines).rstrip() + "\n"


def write_outputs(results: list[dict[str, Any]], header: dict[str, Any], out: Path) -> list[Path]:
    """Print the table and recommendations; write compare.md / .csv / .json and the charts."""
    rows = table_rows(results)
    advice = recommendations(rows)
    charts = draw_charts(rows, out)
    print()
    print(terminal_table(rows))
    print()
    for line in advice:
        print(line)
    written = [out / "compare.md", out / "compare.csv", out / "compare.json"]
    atomic_write_bytes(written[0], markdown_report(rows, header, charts, advice).encode())
    atomic_write_bytes(written[1], csv_text(rows).encode())
    body = dumps_strict({**header, "results": results, "recommendations": advice}, indent=2)
    atomic_write_bytes(written[2], (body + "\n").encode())
    print(f"\nwritten: {', '.join(str(p) for p in [*written, *charts])}")
    return [*written, *charts]
