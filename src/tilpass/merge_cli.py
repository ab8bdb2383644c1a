"""`tilpass merge`: fold an adapter into its base and save a standard `transformers` directory.

The base is loaded in full precision (`--dtype fp32 | bf16`), the adapter is loaded onto it
(a QLoRA adapter is an ordinary LoRA file), merged, and the result is written with the base's
tokenizer, so `AutoModelForCausalLM.from_pretrained(OUT)` needs neither tilpass nor the
adapter. Merging into a quantized base (`--quantize nf4`) rounds the merged weights to the
4-bit grid again and so changes the outputs: it is refused unless `--requantize` asks for it,
and then the largest logit difference it caused is printed. The output directory is written
under a temporary name and renamed into place, so it never exists half-written.

Several `--adapter`s (with `--weights`, `--combination linear|cat|ties`, `--density`) are
combined into one (`merge_combine.py`), saved as a full model or, with `--as adapter`, as a new
adapter directory. Every merge checks itself: its largest logit difference from base + adapter
above the dtype's tolerance (`--tolerance`) is reported as a warning and the exit code is 1.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tilpass.merge_combine import COMBINATIONS, PROMPTS, TOLERANCE, LogitCheck

QUANTIZE_CHOICES = ("nf4", "fp4", "int8")
"""`--quantize` formats (as in `tilpass.quantize.QUANT_TYPES`; listed here so that building
the command's parser does not import torch)."""

DTYPES = ("fp32", "bf16")
PROBE = "The capital of France is"
"""The prompt whose logits are compared before and after merging."""


def add_quantize_argument(parser: argparse.ArgumentParser) -> None:
    """`--quantize FORMAT` for commands that load the base (train, quickstart, merge)."""
    parser.add_argument(
        "--quantize",
        choices=QUANTIZE_CHOICES,
        default=None,
        help="load the base quantized through bitsandbytes (nf4 with an adapter: QLoRA)",
    )


def add_merge_parser(sub: Any) -> None:
    """The `tilpass merge` subcommand."""
    p = sub.add_parser(
        "merge",
        help="merge an adapter into its base and save a standard transformers model",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("--base", required=True, help="base model name or local directory")
    p.add_argument(
        "--adapter",
        required=True,
        action="append",
        help="adapter directory (PEFT layout); repeat to combine several",
    )
    p.add_argument("--out", required=True, help="new directory for the merged model")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="dtype of the merged weights")
    p.add_argument("--weights", help="one weight per --adapter, comma-separated (e.g. 0.7,0.3)")
    p.add_argument(
        "--combination",
        choices=COMBINATIONS,
        default="linear",
        help="how to combine several adapters: linear (exact weighted sum), cat, ties",
    )
    p.add_argument("--density", type=float, help="ties: the fraction of entries each keeps")
    p.add_argument(
        "--as",
        dest="output",
        choices=("model", "adapter"),
        default="model",
        help="write a full model (default) or the combined adapter",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        help="largest logit difference the self-check accepts, relative to the largest logit "
        "(default: 1e-4 for fp32, 5e-2 for bf16)",
    )
    add_quantize_argument(p)
    p.add_argument(
        "--requantize",
        action="store_true",
        help="with --quantize: merge into the quantized base (re-quantizes; changes outputs)",
    )
    p.set_defaults(func=cmd_merge)


@dataclass
class MergeResult:
    """Where the merged model went and how far its logits moved from base + adapter."""

    out: Path
    max_logit_difference: float
    requantized: bool
    relative_difference: float = 0.0


def cmd_merge(args: argparse.Namespace, extra: list[str]) -> int:
    """Run `tilpass merge` and print what it did."""
    if args.requantize and not args.quantize:
        raise ValueError("--requantize only applies with --quantize FORMAT (a quantized base)")
    if len(args.adapter) > 1 or args.output == "adapter" or args.weights is not None:
        return cmd_combine(args)
    (adapter,) = args.adapter
    result = merge_adapter(
        args.base, adapter, Path(args.out), args.dtype, args.quantize, args.requantize
    )
    how = f"into the {args.quantize} base, re-quantized" if result.requantized else args.dtype
    print(f"merged {args.adapter} into {args.base} ({how}); saved {result.out}")
    print(
        "largest logit difference from base + adapter on a probe prompt: "
        f"{result.max_logit_difference:.3g}"
    )
    print(f"load it with: AutoModelForCausalLM.from_pretrained({str(result.out)!r})")
    limit = TOLERANCE[args.dtype] if args.tolerance is None else args.tolerance
    if not result.requantized and result.relative_difference > limit:
        check = LogitCheck(result.max_logit_difference, result.relative_difference)
        print(self_check_warning(check, limit, args.dtype), file=sys.stderr)
        return 1
    return 0


def self_check_warning(check: LogitCheck, limit: float, dtype: str) -> str:
    """The warning a merge prints when its result differs from base + adapter too much."""
    return (
        f"warning: the merge changed the logits by up to {check.describe()}, more than the "
        f"{limit:g} allowed for {dtype}: the result does not compute what base + adapter "
        "computes; check the adapter and the base (or use --dtype fp32)"
    )


def cmd_combine(args: argparse.Namespace) -> int:
    """`tilpass merge` with several adapters, weights or `--as adapter` (`merge_combine.py`)."""
    from tilpass.merge_combine import CombineRequest, combine_adapters, parse_weights

    if args.quantize:
        raise ValueError("combining adapters works on the full-precision base; drop --quantize")
    request = CombineRequest(
        base=args.base,
        adapters=[Path(a) for a in args.adapter],
        weights=parse_weights(args.weights, len(args.adapter)),
        out=Path(args.out),
        combination=args.combination,
        density=args.density,
        output=args.output,
        dtype=args.dtype,
        tolerance=args.tolerance,
    )
    result = combine_adapters(request)
    parents = ", ".join(f"{a} x {w:g}" for a, w in zip(args.adapter, request.weights, strict=True))
    print(f"combined {parents} ({args.combination}); saved the {args.output} at {result.out}")
    print(
        f"self-check: largest logit difference from base + combined adapter on "
        f"{len(PROMPTS)} prompts: {result.check.describe()} "
        f"(tolerance {result.tolerance:g} of the largest logit)"
    )
    if not result.passed:
        print(
            self_check_warning(result.check, result.tolerance, args.dtype),
            file=sys.stderr,
        )
        return 1
    return 0


def merge_adapter(
    base: str,
    adapter: str | Path,
    out: Path,
    dtype: str = "fp32",
    quantize: str | None = None,
    requantize: bool = False,
) -> MergeResult:
    """Merge `adapter` into `base` and save the result at `out` (which must not exist yet)."""
    import torch

    from tilpass.model import AdaptedModel
    from tilpass.pretrained import load_model
    from tilpass.quantize import allow_requantize, dequantize_model

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists; give a new directory for --out")
    torch_dtype = torch.float32 if dtype == "fp32" else torch.bfloat16
    model, tokenizer = load_model(base, dtype=torch_dtype, quantize=quantize)
    adapted = AdaptedModel.from_pretrained(model, adapter)
    probe = tokenizer(PROBE, return_tensors="pt").input_ids
    with torch.no_grad():
        before = adapted(probe).logits.float()
        allowed = allow_requantize() if requantize else contextlib.nullcontext()
        with allowed:
            merged = adapted.merge_and_unload()
        after = merged(probe).logits.float()
    if quantize is not None:
        dequantize_model(merged, torch_dtype)
    _save_atomically(merged, tokenizer, out)
    check = LogitCheck.compare([after], [before])
    return MergeResult(out, check.absolute, quantize is not None, check.relative)


def _save_atomically(model: Any, tokenizer: Any, out: Path) -> None:
    """save_pretrained into a hidden sibling directory, then rename it to `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if out.exists():  # an empty directory (checked by the caller)
            out.rmdir()
        os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
