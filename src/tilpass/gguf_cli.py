"""`tilpass export-gguf [--model M] [--adapter DIR] --out FILE.gguf [--type f16|q8_0]`.

The base (default: the default model) is loaded in float32, the adapter (if any) merged into
it, and the result written as GGUF (`gguf_export.py`) under a temporary name, read back with
`transformers` and compared on a few prompts with base + adapter (unmerged): a largest logit
difference above the type's tolerance (relative to the largest logit) is reported as a warning
and the exit code is 1. Bad input (no adapter directory, an adapter of other shapes, an existing
--out) is refused before anything is written.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GGUF_TYPES = ("f16", "q8_0")


def add_export_gguf_parser(sub: Any) -> None:
    """The `tilpass export-gguf` subcommand."""
    p = sub.add_parser(
        "export-gguf",
        help="write the (merged) model as a GGUF file for llama.cpp, Ollama, transformers",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("--model", default=None, help="base model (default: the default model)")
    p.add_argument("--adapter", help="adapter directory to merge in first")
    p.add_argument("--out", required=True, help="the new .gguf file")
    p.add_argument("--type", dest="kind", choices=GGUF_TYPES, default="f16", help="weight type")
    p.add_argument("--tolerance", type=float, help="relative logit difference the check accepts")
    p.add_argument(
        "--allow-other-base",
        action="store_true",
        help="export even when the adapter records another base model than --model",
    )
    p.set_defaults(func=cmd_export_gguf)


@dataclass
class GgufResult:
    """Where the file went and how far its logits are from base + adapter (relative)."""

    out: Path
    relative_difference: float
    tolerance: float


def cmd_export_gguf(args: argparse.Namespace, extra: list[str]) -> int:
    """Run `tilpass export-gguf` and print what it did."""
    from tilpass.pretrained import DEFAULT_MODEL

    model = args.model or DEFAULT_MODEL
    result = export_gguf(
        model, args.adapter, Path(args.out), args.kind, args.tolerance, args.allow_other_base
    )
    print(
        f"wrote {result.out} ({args.kind}) from {model}"
        + (f" + {args.adapter}" if args.adapter else "")
    )
    print(
        "self-check: largest logit difference (transformers reading the file vs base + adapter), "
        f"relative to the largest logit: {result.relative_difference:.3g} "
        f"(tolerance {result.tolerance:g})"
    )
    if result.relative_difference > result.tolerance:
        print(
            f"warning: the GGUF file's logits differ by more than {args.kind}'s tolerance; "
            "do not ship it without finding out why",
            file=sys.stderr,
        )
        return 1
    return 0


def check_request(adapter: str | None, out: Path) -> None:
    """Refuse an existing output, a name without .gguf, or an adapter path that is none."""
    from tilpass.export_check import read_adapter

    if out.suffix != ".gguf":
        raise ValueError(f"--out {out}: give a file name ending in .gguf")
    if out.exists():
        raise FileExistsError(f"{out} already exists; give a new file for --out")
    if adapter is not None:
        read_adapter(Path(adapter))


def export_gguf(
    model_name: str,
    adapter: str | None,
    out: Path,
    kind: str,
    tolerance: float | None = None,
    allow_other_base: bool = False,
) -> GgufResult:
    """Merge, write, reload and compare (see the module docstring). An adapter whose record
    (or config) names another base model is refused unless `allow_other_base`."""
    import torch

    from tilpass.card import base_model_warning
    from tilpass.errors import TilpassError
    from tilpass.gguf_export import TOLERANCE, reload_logits, write_gguf
    from tilpass.merge_combine import PROMPTS
    from tilpass.model import AdaptedModel
    from tilpass.pretrained import DEFAULT_MODEL_ALIASES, load_model

    check_request(adapter, out)
    if adapter is not None:
        other = base_model_warning(adapter, model_name)
        if other and not allow_other_base:
            raise TilpassError(
                other.removeprefix("warning: ") + "; nothing written (pass --allow-other-base "
                "to export the merge anyway)"
            )
        if other:
            print(other)
    model, tokenizer = load_model(model_name, dtype=torch.float32)
    prompts = [tokenizer(p, return_tensors="pt").input_ids for p in PROMPTS]
    if adapter is not None:
        model = AdaptedModel.from_pretrained(model, adapter)
    with torch.no_grad():
        reference = [model(ids).logits.float() for ids in prompts]
    if adapter is not None:
        model = model.merge_and_unload()
    pre = "smollm" if model_name in DEFAULT_MODEL_ALIASES else "gpt2"
    name = Path(model_name).name + (f" + {Path(adapter).name}" if adapter else "")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.stem}.tmp-{os.getpid()}-{secrets.token_hex(4)}.gguf"
    try:
        write_gguf(model, tokenizer, staging, kind, name, pre)
        written = reload_logits(staging, prompts)
        os.replace(staging, out)
    finally:
        staging.unlink(missing_ok=True)
    scale = max(float(r.abs().max()) for r in reference)
    diff = max(float((w - r).abs().max()) for w, r in zip(written, reference, strict=True))
    limit = TOLERANCE[kind] if tolerance is None else tolerance
    return GgufResult(out, diff / max(scale, 1e-12), limit)
