"""`tilpass memory`: how much memory training would take, read from the model's config alone.

The estimate itself is in `tilpass.memory` (which imports torch); this module only builds the
command's parser, so `tilpass --help` stays fast.
"""

from __future__ import annotations

import argparse
from typing import Any

METHOD_CHOICES = ("full", "lora", "qlora")
PRESET_NAMES = ("llama-2-7b", "llama-2-13b", "llama-2-70b")


def add_memory_parser(sub: Any) -> None:
    """The `tilpass memory` subcommand."""
    p = sub.add_parser(
        "memory",
        help="estimate training memory per method from a model's config (no weights loaded)",
        description=__doc__.splitlines()[0],
    )
    p.add_argument(
        "--model",
        default="SmolLM2-135M-Instruct",
        help=f"model name or directory, a config.json, or one of {', '.join(PRESET_NAMES)}",
    )
    p.add_argument(
        "--method",
        choices=METHOD_CHOICES,
        action="append",
        help="method(s) to show (repeatable; default: all three side by side)",
    )
    p.add_argument("--r", type=int, default=16, help="LoRA rank")
    p.add_argument(
        "--target-modules",
        default="all-linear",
        help="comma-separated module names, or all-linear (default, as in the QLoRA paper)",
    )
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--seq", type=int, default=512, help="tokens per sequence")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="base/compute dtype")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing on")
    p.set_defaults(func=cmd_memory)


def cmd_memory(args: argparse.Namespace, extra: list[str]) -> int:
    """Print the per-method table."""
    from tilpass.memory import DTYPE_NAMES, MemoryOptions, estimate, render

    for name, value in (("--r", args.r), ("--batch", args.batch), ("--seq", args.seq)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    targets: list[str] | str = args.target_modules
    if targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    options = MemoryOptions(
        r=args.r,
        target_modules=targets,
        batch=args.batch,
        seq=args.seq,
        dtype=DTYPE_NAMES[args.dtype],
        checkpointing=args.checkpointing,
    )
    methods = tuple(args.method) if args.method else METHOD_CHOICES
    config, estimates = estimate(args.model, methods, options)
    print(render(args.model, config, estimates, options))
    return 0
