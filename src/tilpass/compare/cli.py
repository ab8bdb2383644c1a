"""`tilpass compare`: its arguments, and writing what the run measured.

Argument parsing, the output files and printing; the runs are in `tilpass.compare.runner`,
the table in `report.py`, the recommendations in `recommend.py`, the charts in `charts.py`.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import time
from pathlib import Path
from typing import Any

from tilpass.compare.plan import DEFAULT_METHODS, DEFAULTS, Budget, CompareError, parse_methods

DEFAULT_STEPS = 25
"""Optimizer steps per method by default: all default methods fit 20 minutes on 2 CPU cores
(the estimate behind it is in docs/compare.md)."""

DEFAULT_EVAL_SAMPLES = 50
RESULT_FILES = ("compare.md", "compare.csv", "compare.json")


def add_compare_parser(sub: Any) -> None:
    """Register `tilpass compare` on the `tilpass` command's subparsers."""
    from tilpass.pretrained import DEFAULT_MODEL

    p = sub.add_parser(
        "compare",
        help="train and measure several methods side by side on your model and data",
        description="Train each method for the same budget on the same data and seed, evaluate "
        "each on the same held-out split, and measure parameters, memory, speed and file size.",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help="model name or local directory")
    p.add_argument("--data", default=None, help="training file (default: the shipped dataset)")
    p.add_argument(
        "--eval",
        default=None,
        help="held-out file (default: the shipped test split, or 10%% of --data held out)",
    )
    p.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help=f"comma-separated, from {','.join(DEFAULTS)} (default: all)",
    )
    budget = p.add_mutually_exclusive_group()
    budget.add_argument(
        "--budget-steps",
        type=int,
        default=None,
        help=f"optimizer steps per method ({DEFAULT_STEPS})",
    )
    budget.add_argument(
        "--budget-minutes", type=float, default=None, help="minutes of training per method"
    )
    p.add_argument("--out", default="runs/compare", help="output directory")
    p.add_argument("--batch-size", type=int, default=8, help="examples per step (every method)")
    p.add_argument("--max-length", type=int, default=128, help="truncate examples to N tokens")
    p.add_argument("--seed", type=int, default=42, help="seed of every run and the data order")
    p.add_argument(
        "--eval-samples",
        type=int,
        default=DEFAULT_EVAL_SAMPLES,
        help="held-out records scored by exact match (0: all; the loss uses all)",
    )
    p.add_argument(
        "--repeats", type=int, default=3, help="timed repeats per latency figure (median)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace a comparison in --out")
    p.set_defaults(func=cmd_compare)


def _budget(args: argparse.Namespace) -> Budget:
    if args.budget_minutes is not None:
        if not args.budget_minutes > 0:
            raise CompareError(f"--budget-minutes must be > 0, got {args.budget_minutes}")
        return Budget(minutes=args.budget_minutes)
    steps = DEFAULT_STEPS if args.budget_steps is None else args.budget_steps
    if steps < 1:
        raise CompareError(f"--budget-steps must be >= 1, got {steps}")
    return Budget(steps=steps)


def _data(args: argparse.Namespace, out: Path) -> tuple[str, str]:
    """The training and held-out files every method uses."""
    from tilpass.cli import shipped_data
    from tilpass.compare.runner import split_data

    if args.data is None:
        return shipped_data("specialty_train.jsonl"), shipped_data("specialty_test.jsonl")
    if args.eval is not None:
        return args.data, args.eval
    return split_data(args.data, out, args.seed)


def _check_counts(args: argparse.Namespace) -> None:
    """The counting options are in range (before any process starts)."""
    for flag, value, low in (
        ("--eval-samples", args.eval_samples, 0),
        ("--repeats", args.repeats, 1),
        ("--batch-size", args.batch_size, 1),
        ("--max-length", args.max_length, 1),
    ):
        if value < low:
            raise CompareError(f"{flag} must be >= {low}, got {value}")


def _check_paths(args: argparse.Namespace) -> None:
    """The data files exist, and --eval comes with --data."""
    for flag, path in (("--data", args.data), ("--eval", args.eval)):
        if path is not None and not Path(path).exists():
            raise CompareError(f"{flag} {path}: no such file or directory")
    if args.data is None and args.eval is not None:
        raise CompareError("--eval needs --data: give the training file too")


def _check_out(out: Path, overwrite: bool) -> None:
    if any((out / name).exists() for name in RESULT_FILES) and not overwrite:
        raise CompareError(
            f"--out {out} already holds a comparison; pass --overwrite to replace it, or choose "
            "another --out"
        )
    out.mkdir(parents=True, exist_ok=True)


def cpu_name() -> str | None:
    """The CPU's model name from /proc/cpuinfo (Linux), or None where there is none."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else None


def machine_line() -> str:
    """The machine the numbers come from: CPU / GPU, cores, torch version."""
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    cpu = cpu_name() or platform.processor() or platform.machine()
    return (
        f"{platform.system()} {cpu}, {os.cpu_count()} cores visible, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), {device}"
    )


def cmd_compare(args: argparse.Namespace, extra: list[str]) -> int:
    """Run the comparison, then print and write the table, charts and recommendations."""
    from tilpass.compare.measure import LatencySettings
    from tilpass.compare.output import write_outputs
    from tilpass.compare.runner import Settings, run_all

    labels = parse_methods(args.methods)
    budget = _budget(args)
    _check_counts(args)
    _check_paths(args)
    out = Path(args.out)
    _check_out(out, args.overwrite)
    train, held_out = _data(args, out)
    settings = Settings(
        model=args.model,
        train=train,
        eval=held_out,
        budget=budget,
        out=out,
        batch_size=args.batch_size,
        max_length=args.max_length,
        seed=args.seed,
        eval_samples=args.eval_samples,
        latency=LatencySettings(repeats=args.repeats),
    )
    started = time.time()
    print(f"tilpass compare: {', '.join(labels)} on {args.model}; {budget.describe()}")
    results = run_all(settings, [DEFAULTS[label] for label in labels])
    header = {
        "command": command_line(args, labels, budget),
        "machine": machine_line(),
        "model": args.model,
        "data": {"train": train, "eval": held_out},
        "budget": budget.describe(),
        "wall_s": time.time() - started,
    }
    write_outputs(results, header, out)
    return 0


def command_line(args: argparse.Namespace, labels: list[str], budget: Budget) -> str:
    """The `tilpass compare` command that reproduces this run's settings."""
    parts = ["tilpass", "compare", "--model", args.model, "--methods", ",".join(labels)]
    if budget.steps:
        parts += ["--budget-steps", str(budget.steps)]
    else:
        parts += ["--budget-minutes", f"{budget.minutes:g}"]
    for flag, value in (("--data", args.data), ("--eval", args.eval)):
        if value is not None:
            parts += [flag, value]
    parts += ["--eval-samples", str(args.eval_samples), "--out", args.out]
    return shlex.join(parts)
