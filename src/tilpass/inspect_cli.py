"""`tilpass inspect`, `verify`, `record` and `card`: what an adapter changed, and its papers.

Argument parsing and printing only (nothing here imports torch when the parser is built); the
work is in `inspect_adapter.py`, `verify.py`, `record.py` and `card_bundle.py`.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tilpass.inspect_adapter import AdapterReport, ModuleReport

CARD_FORMATS = ("md", "html", "pdf")


def add_inspect_parser(sub: Any) -> None:
    """The `tilpass inspect` subcommand."""
    p = sub.add_parser(
        "inspect",
        help="what an adapter changes: modules, ranks, sizes; with --base each weight change",
        description="Describe an adapter directory. Without --base only its files are read.",
    )
    p.add_argument("directory", help="adapter directory (PEFT layout)")
    p.add_argument(
        "--base", default=None, help="base model: measure each module's weight change on it"
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--plot", default=None, help="with --base: draw the changes per layer (PNG)")
    p.set_defaults(func=cmd_inspect)


def add_verify_parser(sub: Any) -> None:
    """The `tilpass verify` subcommand."""
    p = sub.add_parser(
        "verify",
        help="recompute the hashes in an adapter's tilpass_record.json, item by item",
        description="Exit code 0 only when every item checked matches the record.",
    )
    p.add_argument("directory", help="adapter (or fine-tuned model) directory with a record")
    p.add_argument("--base", default=None, help="base model whose weights to check")
    p.add_argument("--data", nargs="+", default=[], help="data files to check")
    p.set_defaults(func=cmd_verify)


def add_record_parser(sub: Any) -> None:
    """The `tilpass record` subcommand."""
    p = sub.add_parser(
        "record",
        help="write tilpass_record.json for an adapter saved elsewhere (e.g. by PEFT)",
        description="Check that the adapter loads on the base, then hash it, the base and data.",
    )
    p.add_argument("directory", help="adapter directory (PEFT layout)")
    p.add_argument("--base", required=True, help="the base model it was trained on")
    p.add_argument("--data", nargs="+", default=[], help="the data files it was trained on")
    p.add_argument("--task", default=None, help="its intended purpose, in a sentence")
    p.add_argument("--overwrite", action="store_true", help="replace an existing record")
    p.set_defaults(func=cmd_record)


def add_card_parser(sub: Any) -> None:
    """The `tilpass card` subcommand."""
    p = sub.add_parser(
        "card",
        help="render an adapter's card, record and evaluation as one document (md, html, pdf)",
        description="A reviewer's document for a change, with technical documentation headings.",
    )
    p.add_argument("directory", help="adapter (or fine-tuned model) directory with a record")
    p.add_argument("--format", choices=CARD_FORMATS, default="md", help="output format")
    p.add_argument("--out", default=None, help="output file (default: DIR/documentation.FORMAT)")
    p.set_defaults(func=cmd_card)


# -- inspect --------------------------------------------------------------------------------
def cmd_inspect(args: argparse.Namespace, extra: list[str]) -> int:
    """Run `tilpass inspect`: print the report (text or JSON), draw the plot if asked."""
    from tilpass.inspect_adapter import inspect_adapter

    if args.plot and not args.base:
        raise ValueError("--plot draws the weight changes, which need --base MODEL")
    if args.plot and not args.plot.lower().endswith(".png"):
        raise ValueError(f"--plot {args.plot}: give a .png file name")
    report = inspect_adapter(args.directory, args.base)
    if args.base:
        from tilpass.card import base_model_warning

        warning = base_model_warning(args.directory, args.base)
        if warning:  # same shapes, other weights: the changes are measured against those
            print(warning, file=sys.stderr)
    if args.plot:
        write_plot(report, Path(args.plot))
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print("\n".join(report_lines(report)))
    return 0


def report_lines(report: AdapterReport) -> list[str]:
    """The human-readable report."""
    from tilpass.inspect_adapter import layer_span, rank_summary

    dtypes = ", ".join(f"{d} ({n})" for d, n in sorted(report.dtypes.items()))
    lines = [
        f"adapter: {report.directory}",
        f"method: {report.method} (PEFT type {report.peft_type})",
        f"base model: {report.base_model or 'not named in adapter_config.json'}",
        f"file: {report.file}, {report.file_bytes:,d} bytes, tensors by dtype: {dtypes}",
        f"trainable parameters: {report.trainable_parameters:,d}",
    ]
    lines += [f"  {key}: {value!r}" for key, value in report.settings.items()]
    if report.virtual_tokens is not None:
        lines.append(f"adds {report.virtual_tokens} virtual tokens before every input")
    kinds: dict[str, list[ModuleReport]] = {}
    for module in report.modules:
        if module.path:
            kinds.setdefault(module.kind, []).append(module)
    if kinds:
        lines += [
            "",
            f"{'module kind':<24}{'count':>6}  {'layers':<10}{'rank':<12}{'parameters':>12}",
        ]
    for kind, modules in kinds.items():
        params = sum(m.parameters for m in modules)
        lines.append(
            f"{kind:<24}{len(modules):>6}  {layer_span(modules):<10}{rank_summary(modules):<12}"
            f"{params:>12,d}"
        )
    if (
        any(m.effective_rank for m in report.modules)
        or len({m.rank for m in report.modules if m.path}) > 1
    ):
        lines += ["", *module_lines(report)]
    if report.base_checked is None:
        lines += ["", "pass --base MODEL to measure each module's weight change"]
    elif not any(m.effective_rank for m in report.modules):
        lines += ["", f"{report.method} adds modules or inputs; it changes no base weight"]
    lines += [f"hint: {hint}" for hint in report.hints]
    return lines


def module_lines(report: AdapterReport) -> list[str]:
    """One row per module: rank, relative change, effective ranks (with a base)."""
    lines = [f"{'module':<44}{'rank':>6}{'|dW|/|W|':>11}{'rank@90%':>10}{'rank@99%':>10}"]
    for m in report.modules:
        if not m.path:
            continue
        norm = f"{m.relative_norm:.3g}" if m.relative_norm is not None else "-"
        r90, r99 = (str(m.effective_rank.get(k, "-")) for k in ("90%", "99%"))
        rank = str(m.rank) if m.rank is not None else "-"
        lines.append(f"{m.path:<44}{rank:>6}{norm:>11}{r90:>10}{r99:>10}")
    return lines


def write_plot(report: AdapterReport, path: Path) -> None:
    """Relative change and effective rank per layer, one line per module kind (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from tilpass.adapter_files import atomic_write_bytes

    measured = [m for m in report.modules if m.effective_rank and m.layer is not None]
    if not measured:
        raise ValueError(
            f"--plot: {report.method} adds modules or inputs, not weight changes; nothing to draw"
        )
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for kind in sorted({m.kind for m in measured}):
        rows = sorted((m for m in measured if m.kind == kind), key=lambda m: m.layer or 0)
        layers = [m.layer for m in rows]
        line = top.plot(layers, [m.relative_norm for m in rows], marker="o", label=kind)[0]
        color = line.get_color()
        bottom.plot(layers, [m.effective_rank["99%"] for m in rows], marker="o", color=color)
        bottom.plot(layers, [m.effective_rank["90%"] for m in rows], linestyle=":", color=color)
    allotted = sorted({m.rank for m in measured if m.rank})
    for rank in allotted:
        bottom.axhline(rank, color="grey", linestyle="--", linewidth=0.8)
    top.set_ylabel("|dW| / |W|")
    bottom.set_ylabel("rank for 99% (dotted: 90%)")
    bottom.set_xlabel("layer")
    top.set_title(f"{report.method} adapter {Path(report.directory).name} on {report.base_checked}")
    top.legend(fontsize="small")
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())


# -- verify, record, card ---------------------------------------------------------------------
def cmd_verify(args: argparse.Namespace, extra: list[str]) -> int:
    """Run `tilpass verify`: one line per item, exit code 1 if any item does not match."""
    from tilpass.verify import verify

    result = verify(Path(args.directory), args.base, [Path(p) for p in args.data])
    print("\n".join(result.lines()))
    return 0 if result.ok else 1


def cmd_record(args: argparse.Namespace, extra: list[str]) -> int:
    """Run `tilpass record`: write the record and say what it holds."""
    from tilpass.record import create_record

    path = create_record(
        Path(args.directory), args.base, [Path(p) for p in args.data], args.task, args.overwrite
    )
    print(f"wrote {path}; check it later with: tilpass verify {args.directory} --base {args.base}")
    return 0


def cmd_card(args: argparse.Namespace, extra: list[str]) -> int:
    """Run `tilpass card`: render the documentation bundle."""
    from tilpass.card_bundle import write_bundle

    directory = Path(args.directory)
    out = Path(args.out) if args.out else directory / f"documentation.{args.format}"
    write_bundle(directory, out, args.format)
    print(f"wrote {out}")
    return 0
