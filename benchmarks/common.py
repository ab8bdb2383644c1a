"""Shared helpers for the scripts in `benchmarks/`: timing, interleaved rounds, ratios, gates,
machine information, tables and JSON output.

Method: every variant of a comparison runs in the same process, in
rounds; each round times every variant once, in an order that rotates from round to round, so
slow drift of the machine (other jobs, thermal state) hits all variants alike. A comparison is
the median over rounds of the per-round ratio, never a ratio of medians.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

T = TypeVar("T")

Timer = Callable[[], float]  # runs one measurement, returns seconds (it may exclude its setup)


# -- timing ----------
def core_llama_config() -> Any:
    """The benchmarks' random Llama: hidden 1024, MLP 2816, 8 layers, 16 heads /
    16 KV heads, vocab 32000, untied, fp32 (168.3M parameters)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=16,
        vocab_size=32000,
        tie_word_embeddings=False,
        torch_dtype=torch.float32,
    )


def shared_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A structural copy whose parameters are the same tensors (no weight memory copied)."""
    return copy.deepcopy(model, memo={id(p): p for p in model.parameters()})


def time_call(
    fn: Callable[[], Any], reps: int = 1, setup: Callable[[], Any] | None = None
) -> float:
    """Mean seconds of `reps` calls of `fn`; `setup` runs before each call, untimed."""
    total = 0.0
    for _ in range(reps):
        if setup is not None:
            setup()
        start = time.perf_counter()
        fn()
        total += time.perf_counter() - start
    return total / reps


def best_time(fn: Callable[[], Any], reps: int = 1) -> float:
    """The fastest of `reps` calls of `fn`, in seconds: on a shared machine other work only
    adds time to a call, so the fastest call is the least disturbed measure of its cost."""
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def best_timer(fn: Callable[[], Any], reps: int = 1) -> Timer:
    """A `Timer` that times `reps` calls of `fn` and returns the fastest."""
    return lambda: best_time(fn, reps)


def timer(fn: Callable[[], Any], reps: int = 1) -> Timer:
    """A `Timer` that times `reps` calls of `fn` and returns the mean."""
    return lambda: time_call(fn, reps)


def rotate(names: Sequence[T], round_index: int) -> list[T]:
    """`names` rotated left by `round_index` (the order of variants in that round)."""
    k = round_index % max(len(names), 1)
    return [*names[k:], *names[:k]]


def interleaved_rounds(
    variants: dict[str, Timer],
    rounds: int,
    warmup: int = 1,
    progress: Callable[[str], None] | None = None,
) -> dict[str, list[float]]:
    """Time every variant once per round, rotating the order; returns seconds per round.

    `warmup` untimed rounds run first (first-call allocations, caches, lazy init).
    """
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        gc.collect()
        for name in rotate(names, r):
            samples[name].append(variants[name]())
        if progress is not None:
            progress(f"round {r + 1}/{rounds}")
    return samples


@dataclass
class Phase:
    """Variants that are timed while some state holds: `enter` sets it up before them and
    `leave` undoes it after them, both untimed (for example an adapter merged in place into
    weights that other variants read unmerged)."""

    variants: dict[str, Timer]
    enter: Callable[[], Any] | None = None
    leave: Callable[[], Any] | None = None

    def run(self, round_index: int, samples: dict[str, list[float]]) -> None:
        if self.enter is not None:
            self.enter()
        try:
            for name in rotate(list(self.variants), round_index):
                samples[name].append(self.variants[name]())
        finally:
            if self.leave is not None:
                self.leave()


def phased_rounds(
    phases: Sequence[Phase],
    rounds: int,
    warmup: int = 1,
    progress: Callable[[str], None] | None = None,
) -> dict[str, list[float]]:
    """`interleaved_rounds` for variants split into phases: each round runs every phase once,
    the phases in an order that rotates from round to round, and so do the variants in each."""
    samples: dict[str, list[float]] = {name: [] for p in phases for name in p.variants}
    for r in range(warmup):
        for phase in phases:
            phase.run(r, {name: [] for name in phase.variants})
    for r in range(rounds):
        gc.collect()
        for phase in rotate(phases, r):
            phase.run(r, samples)
        if progress is not None:
            progress(f"round {r + 1}/{rounds}")
    return samples


# -- statistics ----------
@dataclass
class Ratio:
    """Median (with min and max) over rounds of the per-round ratio num / den."""

    median: float
    low: float
    high: float
    rounds: int

    def __str__(self) -> str:
        return f"{self.median:.3f} [{self.low:.3f}-{self.high:.3f}]"


def per_round_ratio(num: Sequence[float], den: Sequence[float]) -> Ratio:
    """Median of num[i] / den[i] over rounds i (the two series come from the same rounds)."""
    if len(num) != len(den) or not num:
        raise ValueError("ratio needs two non-empty series from the same rounds")
    values = [a / b for a, b in zip(num, den, strict=True)]
    return Ratio(statistics.median(values), min(values), max(values), len(values))


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def rel_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """max |actual - reference| / max |reference| over the whole tensor (computed in float64)."""
    a, b = actual.detach().double(), reference.detach().double()
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)


# -- gates ----------
@dataclass
class Gate:
    """A measured value against a limit: `value <= limit` (op "<=") or `value >= limit`."""

    name: str
    value: float
    limit: float
    op: str  # "<=" or ">="
    detail: str = ""
    passed: bool = field(init=False)

    def __post_init__(self) -> None:
        if self.op not in ("<=", ">="):
            raise ValueError(f"op must be '<=' or '>=', got {self.op!r}")
        self.passed = self.value <= self.limit if self.op == "<=" else self.value >= self.limit

    @property
    def verdict(self) -> str:
        return "PASS" if self.passed else "FAIL"

    def line(self) -> str:
        extra = f"  ({self.detail})" if self.detail else ""
        return f"{self.verdict}  {self.name}: {self.value:.3f} {self.op} {self.limit:g}{extra}"


# -- machine ----------
def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (Linux), else `platform.processor()`."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def package_version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


def machine_info(packages: Sequence[str] = ("torch", "transformers", "peft")) -> dict[str, Any]:
    """CPU, cores, threads, load, package versions and the date, for the results file."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    try:
        import psutil

        info["physical_cores"] = psutil.cpu_count(logical=False)
        info["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    with contextlib.suppress(OSError):
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    for name in packages:
        info[name] = package_version(name)
    return info


def machine_line(info: dict[str, Any]) -> str:
    """One line: CPU, cores, threads, versions, date."""
    versions = ", ".join(
        f"{k} {info[k]}" for k in ("torch", "transformers", "peft", "tilpass") if info.get(k)
    )
    load = info.get("load_average")
    load_text = f", load avg {load[0]:.1f}" if load else ""
    return (
        f"{info['cpu']}, {info['logical_cores']} logical cores, "
        f"{info['torch_threads']} torch threads{load_text}; {versions}; "
        f"Python {info['python']}; {info['date']}"
    )


# -- output ----------
def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-markdown table (also readable as plain text)."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]

    def fmt(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(headers), sep, *(fmt(r) for r in cells)])


def to_jsonable(obj: Any) -> Any:
    """Dataclasses, tuples and tensors turned into JSON-ready values."""
    if hasattr(obj, "__dataclass_fields__"):
        return to_jsonable(asdict(obj))
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return obj


def write_json(path: str | Path, data: Any) -> None:
    """Write `data` as indented JSON (via a temporary name, then renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(to_jsonable(data), indent=2) + "\n")
    os.replace(tmp, path)
