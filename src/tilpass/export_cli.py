"""`tilpass export DIR --check vllm|lorax|peft [--fix --out NEW_DIR]`: will the adapter load
there, and if not, why; with `--fix`, the faithful conversions (never a lossy one).

Exit codes: 0 when the adapter loads on that server as it is (or, with `--fix`, when the
fixed copy does); 1 when it does not (a finding remains); 2 for bad input.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

SEVERITY_WORDS = {
    "blocks": "does not load",
    "conversion": "needs conversion",
    "fixable": "fixable (exact)",
    "option": "loads with a server option",
}


def add_export_parser(sub: Any) -> None:
    """The `tilpass export` subcommand."""
    p = sub.add_parser(
        "export",
        help="check whether an adapter loads in vLLM, LoRAX or PEFT (and fix what is exact)",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("adapter", help="adapter directory (PEFT layout)")
    p.add_argument("--check", required=True, choices=("vllm", "lorax", "peft"), help="server")
    p.add_argument("--fix", action="store_true", help="apply the exact conversions into --out")
    p.add_argument("--out", help="with --fix: the new adapter directory")
    p.add_argument("--json", action="store_true", help="print the findings as JSON")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace, extra: list[str]) -> int:
    """Run `tilpass export`: print the findings, apply `--fix` when every one is fixable."""
    from tilpass.export_check import check_adapter, read_adapter

    if args.fix and not args.out:
        raise ValueError("--fix writes a new adapter directory: give it with --out NEW_DIR")
    if args.out and Path(args.out).exists():
        raise FileExistsError(f"{args.out} already exists; give a new directory for --out")
    facts = read_adapter(Path(args.adapter))
    findings = check_adapter(facts, args.check)
    if args.json:
        print(json.dumps([f.__dict__ for f in findings], indent=2))
    else:
        print_findings(args.adapter, args.check, findings)
    if not args.fix or not findings:
        return 1 if findings else 0
    return apply_fix(args, facts, findings)


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


def apply_fix(args: argparse.Namespace, facts: Any, findings: list[Any]) -> int:
    """Apply the exact fixes; refuse (nothing written) while anything else remains."""
    from tilpass.export_check import check_adapter, read_adapter
    from tilpass.export_fix import pad_ranks

    rest = [f for f in findings if f.severity not in ("fixable", "option")]
    if rest:
        names = ", ".join(f"{f.rule} ({SEVERITY_WORDS[f.severity]})" for f in rest)
        raise ValueError(
            f"--fix wrote nothing: {names} has no exact conversion here; see the findings above"
        )
    if not any(f.severity == "fixable" for f in findings):
        print("nothing to fix: what remains is a server option (see above)")
        return 0
    rank = pad_ranks(facts, Path(args.out))
    print(f"wrote {args.out}: every module padded to rank {rank}, scales folded into B (exact)")
    left = check_adapter(read_adapter(Path(args.out)), args.check)
    print_findings(args.out, args.check, left)
    return 0 if all(f.severity == "option" for f in left) else 1
