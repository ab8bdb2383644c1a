"""`tilpass merge --adapter A --adapter B --weights 0.7,0.3`: combine LoRA adapters into one.

Combinations (each adapter's update is Delta_i = s_i B_i A_i, weights w_i):

- `linear`: sum_i w_i Delta_i, exactly. As an adapter it is stored as the concatenation of the
  scaled factors (rank = the sum of the ranks), so `cat` gives the same adapter; PEFT's own
  `linear` (square-root weights on A and B, a rough approximation) is not used here.
- `cat`: the same concatenation under PEFT's name.
- `ties`: PEFT's `ties` combination (trim to `--density`, elect a sign per entry, average the
  agreeing entries), applied to the A's and the B's; all ranks must be equal.

The result is a new adapter directory (`--as adapter`) or the base with it merged in, a full
`transformers` directory (`--as model`, the default). Every merge checks itself: a few prompts
run through base + combined adapter (unmerged) and through what was written (reloaded from
disk); the largest logit difference above the dtype's tolerance is reported as a warning and
the command exits non-zero. The card and `tilpass_record.json` name the parents (with their
files' hashes) and the weights. Inputs are checked before anything is loaded or written.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tilpass.adapter_files import WEIGHTS_NAME, atomic_write_bytes, file_sha256
from tilpass.config import CONFIG_NAME, read_config_dict

COMBINATIONS = ("linear", "cat", "ties")
PEFT_KIND = {"linear": "cat", "cat": "cat", "ties": "ties"}
"""The `add_weighted_adapter` combination type each CLI combination uses."""
TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2}
"""The largest logit difference a merge may cause, relative to the largest logit, per dtype of
the written weights (measured on the default model: fp32 1.5e-6, bf16 1.75e-2; docs/export.md)."""
PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, a small robot",
)
"""The prompts every merge checks itself on."""


class MergeInputError(ValueError):
    """A merge request that cannot be carried out; nothing has been written."""


@dataclass(frozen=True)
class Parent:
    """One adapter to combine: its directory, config, weight and file hash."""

    path: Path
    config: dict[str, Any]
    weight: float
    sha256: str


@dataclass
class CombineRequest:
    """What `tilpass merge` with several adapters (or `--as adapter`) is asked to do."""

    base: str
    adapters: list[Path]
    weights: list[float]
    out: Path
    combination: str = "linear"
    density: float | None = None
    output: str = "model"
    dtype: str = "fp32"
    tolerance: float | None = None
    parents: list[Parent] = field(default_factory=list)

    @property
    def limit(self) -> float:
        return TOLERANCE[self.dtype] if self.tolerance is None else self.tolerance


@dataclass(frozen=True)
class LogitCheck:
    """The largest logit difference between what was written and base + adapter, absolute and
    relative to the largest logit magnitude (what the tolerance applies to)."""

    absolute: float
    relative: float

    @classmethod
    def compare(cls, written: list[Any], reference: list[Any]) -> LogitCheck:
        """Compare lists of logits tensors prompt by prompt."""
        pairs = zip(written, reference, strict=True)
        absolute = max(float((w - r).abs().max()) for w, r in pairs)
        scale = max(float(r.abs().max()) for r in reference)
        return cls(absolute, absolute / max(scale, 1e-12))

    def describe(self) -> str:
        return f"{self.absolute:.3g} ({self.relative:.3g} of the largest logit)"


@dataclass
class CheckResult:
    """Where the combination went and how its logits compare with the unmerged adapter's."""

    out: Path
    check: LogitCheck
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.check.relative <= self.tolerance


def parse_weights(text: str | None, count: int) -> list[float]:
    """`--weights 0.7,0.3` as floats, one per adapter (default: 1 each)."""
    if text is None:
        return [1.0] * count
    try:
        weights = [float(part) for part in text.split(",")]
    except ValueError:
        raise MergeInputError(
            f"--weights {text!r} is not a comma-separated list of numbers (e.g. 0.7,0.3)"
        ) from None
    if len(weights) != count:
        raise MergeInputError(
            f"--weights gives {len(weights)} weights for {count} adapters; give one per --adapter"
        )
    return weights


def read_parent(path: Path, weight: float) -> Parent:
    """Read and check one adapter directory (a LoRA adapter in the PEFT layout)."""
    config, weights_file = read_config_dict(path), path / WEIGHTS_NAME
    config_file = path / CONFIG_NAME
    if config["peft_type"] != "LORA":
        kind = config["peft_type"]
        raise MergeInputError(
            f'{config_file}: peft_type is {kind!r}; only LoRA adapters (peft_type "LORA") can '
            "be combined"
        )
    if not weights_file.is_file():
        raise MergeInputError(f"{path} has no {WEIGHTS_NAME}; the adapter's tensors are missing")
    return Parent(path, config, weight, file_sha256(weights_file))


def recorded_base(parent: Parent) -> tuple[str | None, str | None]:
    """(base name, base weights hash) an adapter names: its record's, else its config's."""
    record = parent.path / "tilpass_record.json"
    if record.is_file():
        try:
            base = json.loads(record.read_text())["base_model"]
            return base.get("name_or_path"), base.get("sha256")
        except (ValueError, KeyError, TypeError, AttributeError):
            raise MergeInputError(
                f"{record} is corrupt (not JSON with a base_model entry); restore it or remove "
                "it (the adapter's config then names the base)"
            ) from None
    return parent.config.get("base_model_name_or_path"), None


def validate(request: CombineRequest) -> None:
    """Check every input before loading anything: adapters, weights, bases, density, --out."""
    if request.combination not in COMBINATIONS:
        raise MergeInputError(
            f"--combination {request.combination!r}: choose one of {', '.join(COMBINATIONS)}"
        )
    if request.combination == "ties" and request.density is None:
        raise MergeInputError("--combination ties needs --density (the fraction kept, e.g. 0.5)")
    if request.density is not None and not 0 < request.density <= 1:
        raise MergeInputError(f"--density must be in (0, 1], got {request.density}")
    out = request.out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MergeInputError(f"{out} already exists; give a new directory for --out")
    if len(request.weights) != len(request.adapters):
        raise MergeInputError(
            f"{len(request.weights)} weights for {len(request.adapters)} adapters; give one "
            "weight per --adapter"
        )
    pairs = zip(request.adapters, request.weights, strict=True)
    request.parents = [read_parent(p, w) for p, w in pairs]
    from tilpass.pretrained import DEFAULT_MODEL, DEFAULT_MODEL_ALIASES

    hashes = {recorded_base(p)[1] for p in request.parents} - {None}
    names = {recorded_base(p)[0] for p in request.parents} - {None, ""}
    names = {DEFAULT_MODEL if n in DEFAULT_MODEL_ALIASES else n for n in names}
    if len(hashes) > 1 or (not hashes and len(names) > 1):
        listing = "; ".join(f"{p.path}: {recorded_base(p)}" for p in request.parents)
        raise MergeInputError(
            f"the adapters were trained on different base models ({listing}); only adapters "
            "of one base can be combined"
        )


def staging_dir(out: Path) -> Path:
    """A hidden sibling of `out` to write into before renaming it into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"


def move_into_place(staging: Path, out: Path) -> None:
    """Rename the finished `staging` to `out` (an empty `out` directory is replaced)."""
    if out.exists():
        out.rmdir()
    os.replace(staging, out)


def combine_adapters(request: CombineRequest) -> CheckResult:
    """Combine the adapters, write the result at `request.out`, and check it (see above)."""
    from tilpass.merge_combine_run import CombineRun

    validate(request)
    staging = staging_dir(request.out)
    try:
        run = CombineRun(request)
        check = run.write(staging)
        move_into_place(staging, request.out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return CheckResult(request.out, check, request.limit)


def write_json(path: Path, value: Any) -> None:
    """Write `value` as indented JSON, atomically."""
    atomic_write_bytes(path, (json.dumps(value, indent=2) + "\n").encode())
