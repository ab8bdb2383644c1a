"""`tilpass export DIR --to lora --out DIR2`: rewrite an adapter in another method's format.

`--to lora` folds an AdaLoRA adapter into a plain LoRA adapter with the same outputs (per-module
ranks in `rank_pattern`, pruned triplets dropped), which PEFT loads as `LORA` and LoRA servers
accept. The output directory is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import argparse
from typing import Any

EXPORT_FORMATS = ("lora",)


def add_export_parser(sub: Any) -> None:
    """The `tilpass export` subcommand."""
    p = sub.add_parser(
        "export",
        help="rewrite an adapter in another format (AdaLoRA -> plain LoRA)",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("adapter", help="adapter directory (PEFT layout)")
    p.add_argument("--to", choices=EXPORT_FORMATS, required=True, help="the format to write")
    p.add_argument("--out", required=True, help="new directory for the exported adapter")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace, extra: list[str]) -> int:
    """Run `tilpass export`; prints what was written."""
    from tilpass.methods.adalora import export_lora

    config = export_lora(args.adapter, args.out)
    ranks = sorted({config.r, *config.rank_pattern.values()})
    print(
        f"wrote {args.out}: LoRA adapter (peft_type LORA), ranks {ranks[0]}-{ranks[-1]} "
        f"(r={config.r}, {len(config.rank_pattern)} modules in rank_pattern), same outputs"
    )
    return 0
