"""`tilpass export`: rewrite an adapter in another format, or check where it will load.

- `tilpass export DIR --to lora --out NEW_DIR` folds an AdaLoRA adapter into a plain LoRA
  adapter with the same outputs (per-module ranks in `rank_pattern`, pruned triplets dropped),
  which PEFT loads as `LORA` and LoRA servers accept.
- `tilpass export DIR --check vllm|lorax|peft [--fix --out NEW_DIR]`: will the adapter load
  there, and if not, why; with `--fix`, the faithful conversions (AdaLoRA -> LoRA, ranks
  padded with zeros, scales folded into B), never a lossy one.

Exit codes: 0 when the adapter loads on that server as it is (or, with `--fix`, when the fixed
copy does); 1 when it does not (a finding remains); 2 for bad input. Every output directory is
written under a temporary name and renamed into place.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

EXPORT_FORMATS = ("lora",)
SEVERITY_WORDS = {
    "blocks": "does not load",
    "conversion": "needs conversion",
    "fixable": "fixable (exact)",
    "option": "loads with a server option",
}
EXACT = ("fixable", "conversion", "option")  # what --fix can take care of


def add_export_parser(sub: Any) -> None:
    """The `tilpass export` subcommand."""
    p = sub.add_parser(
        "export",
        help="rewrite an adapter (AdaLoRA -> LoRA) or check whether it loads in vLLM, LoRAX, PEFT",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("adapter", help="adapter directory (PEFT layout)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--to", choices=EXPORT_FORMATS, help="rewrite into this format (--out)")
    what.add_argument("--check", choices=("vllm", "lorax", "peft"), help="server to check for")
    p.add_argument("--fix", action="store_true", help="with --check: apply the exact conversions")
    p.add_argument("--out", help="the new adapter directory (--to, --fix)")
    p.add_argument("--json", action="store_true", help="with --check: print findings as JSON")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace, extra: list[str]) -> int:
    """Run `tilpass export`."""
    if (args.to or args.fix) and not args.out:
        raise ValueError("this writes a new adapter directory: give it with --out NEW_DIR")
    if args.fix and not args.check:
        raise ValueError("--fix goes with --check SERVER")
    if args.out and Path(args.out).exists():
        raise FileExistsError(f"{args.out} already exists; give a new directory for --out")
    if args.to:
        return export_to_lora(args.adapter, args.out)
    from tilpass.export_check import check_adapter, read_adapter

    facts = read_adapter(Path(args.adapter))
    findings = check_adapter(facts, args.check)
    if args.json:
        print(json.dumps([f.__dict__ for f in findings], indent=2))
    else:
        print_findings(args.adapter, args.check, findings)
    if not args.fix or not findings:
        return 1 if findings else 0
    return apply_fix(args, findings)


def export_to_lora(adapter: str, out: str) -> int:
    """`--to lora`: fold an AdaLoRA adapter into a plain LoRA adapter; prints what was written."""
    from tilpass.methods.adalora import export_lora

    config = export_lora(adapter, out)
    ranks = sorted({config.r, *config.rank_pattern.values()})
    print(
        f"wrote {out}: LoRA adapter (peft_type LORA), ranks {ranks[0]}-{ranks[-1]} "
        f"(r={config.r}, {len(config.rank_pattern)} modules in rank_pattern), same outputs"
    )
    return 0


def print_findings(adapter: str, server: str, findings: list[Any]) -> None:
    """One line per finding, with what to do about it."""
    if not findings:
        print(f"{adapter}: loads in {server} as it is")
        return
    print(f"{adapter}: {len(findings)} finding(s) for {server}:")
    for f in findings:
        print(f"- [{SEVERITY_WORDS[f.severity]}] {f.rule}: {f.message}")
        if f.fix:
            print(f"    what to do: {f.fix}")


def apply_fix(args: argparse.Namespace, findings: list[Any]) -> int:
    """Apply the exact fixes (AdaLoRA -> LoRA first, then rank padding) into `--out`; refuse,
    writing nothing, while anything without an exact fix remains."""
    from tilpass.export_check import check_adapter, read_adapter
    from tilpass.export_fix import pad_ranks

    rest = [f for f in findings if f.severity not in EXACT]
    if rest:
        names = ", ".join(f"{f.rule} ({SEVERITY_WORDS[f.severity]})" for f in rest)
        raise ValueError(
            f"--fix wrote nothing: {names} has no exact conversion here; see the findings above"
        )
    out = Path(args.out)
    source, staging = Path(args.adapter), None
    if any(f.severity == "conversion" for f in findings):
        staging = out.parent / f".{out.name}.lora-{os.getpid()}-{secrets.token_hex(4)}"
        export_to_lora(str(source), str(staging))
        source = staging
    try:
        facts = read_adapter(source)
        fixable = [f for f in check_adapter(facts, args.check) if f.severity == "fixable"]
        if fixable:
            rank = pad_ranks(facts, out)
            print(f"wrote {out}: every module padded to rank {rank}, scales folded into B (exact)")
        elif staging is not None:
            os.replace(staging, out)
            staging = None
        else:
            print("nothing to fix: what remains is a server option (see above)")
            return 0
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    left = check_adapter(read_adapter(out), args.check)
    print_findings(str(out), args.check, left)
    return 0 if all(f.severity == "option" for f in left) else 1
