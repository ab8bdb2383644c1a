"""One row of `tilpass compare`, in a process of its own: train, evaluate, measure, report.

    python -m tilpass.compare.child SPEC.json

The spec (written by `tilpass.compare.runner`) holds a `tilpass train` config, the latency
settings and where to write the result. A method's child runs `tilpass.run.run` (the same
steps as `tilpass train`: same data order and seed for every method), reads its peak memory
right after training (peak resident memory on a CPU, `torch.cuda.max_memory_allocated` on a
GPU; the process is fresh, so the peak is this method's), then loads what it saved as a user
would and times inference (merged too, for the methods that merge). The base model's child
evaluates and times the base. Either writes one JSON result; a failure writes the error into
it and exits with status 1, so the comparison goes on with the other methods.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from tilpass.adapter_files import atomic_write_bytes
from tilpass.compare.measure import (
    LatencySettings,
    files_bytes,
    measure_latency,
    parameter_count,
)
from tilpass.json_files import dumps_strict
from tilpass.train_hooks import TrainState

FAIL_ENV = "TILPASS_COMPARE_FAIL"
"""Test hook: a comma-separated list of row labels whose child fails on purpose."""


class TimeLimit:
    """A training hook that stops the loop once `seconds` have passed since its first step."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.started: float | None = None

    def on_step_end(self, state: TrainState) -> None:
        """Start the clock after the first step; ask the loop to stop when time is up."""
        now = time.perf_counter()
        if self.started is None:
            self.started = now
        elif now - self.started >= self.seconds:
            state.should_stop = True


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _train_seconds(out: Path) -> float | None:
    """Seconds from the loop's start to its last logged step (evaluation excluded)."""
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in events if e.get("event") == "train"]
    return float(train[-1]["elapsed_s"]) if train else None


def _quality(metrics: dict[str, Any]) -> dict[str, Any]:
    return {"eval_loss": metrics.get("loss"), "exact_match": metrics.get("exact_match")}


def train_row(spec: dict[str, Any]) -> dict[str, Any]:
    """Train one method with `tilpass.run.run` and measure it; returns the row's numbers."""
    from tilpass.run import build_config, run
    from tilpass.runtime import apply_process_settings, peak_memory_mb

    config = build_config(spec["config"], "tilpass compare")
    apply_process_settings(config.training)  # as `tilpass train` does
    minutes = float(spec.get("budget_minutes") or 0)
    hooks = [TimeLimit(60 * minutes)] if minutes else []
    result = run(config, overwrite=True, callbacks=hooks)
    peak = peak_memory_mb(_device())
    record = json.loads((result.saved_dir / "tilpass_record.json").read_text())
    saved = record["model" if "model" in record else "adapter"]
    tokens, seconds = record["training"]["tokens"], _train_seconds(Path(config.output_dir))
    row: dict[str, Any] = {
        "trainable_params": saved["trainable_parameters"],
        "train_peak_mb": peak,
        "train_steps": record["training"]["steps"],
        "train_tokens": tokens,
        "train_s": seconds,
        "train_tokens_per_s": tokens / seconds if seconds else None,
        "file_bytes": files_bytes(result.saved_dir),
        **_quality(result.after),
    }
    del result
    gc.collect()
    row |= inference_rows(spec, config.model, config.quantize, Path(config.output_dir))
    return row


def inference_rows(
    spec: dict[str, Any], model_name: str, quantize: str | None, out: Path
) -> dict[str, Any]:
    """Load the saved adapter (or full model) as a user would, and time it (merged too)."""
    from tilpass.model import AdaptedModel
    from tilpass.pretrained import load_model

    settings = LatencySettings(**spec["latency"])
    device = "cuda" if torch.cuda.is_available() else None
    if (out / "model").is_dir():
        model, tokenizer = load_model(str(out / "model"), device=device)
        base_params = None
    else:
        base, tokenizer = load_model(model_name, device=device, quantize=quantize)
        base_params = parameter_count(base)
        model = AdaptedModel.from_pretrained(base, out / "adapter")
    row: dict[str, Any] = {
        "base_params": base_params,
        "inference_params": parameter_count(model),
        "latency": measure_latency(model, tokenizer, settings).to_dict(),
    }
    if spec.get("merged_row"):
        merged = model.merge_and_unload()
        row["merged"] = {
            "inference_params": parameter_count(merged),
            "latency": measure_latency(merged, tokenizer, settings).to_dict(),
        }
    return row


def base_row(spec: dict[str, Any]) -> dict[str, Any]:
    """Evaluate and time the base model, with the settings every method's row uses."""
    from tilpass.pretrained import load_model, resolve_model_path
    from tilpass.run import build_config, held_out_metrics, load_data
    from tilpass.runtime import peak_memory_mb

    config = build_config(spec["config"], "tilpass compare")
    device = "cuda" if torch.cuda.is_available() else None
    model, tokenizer = load_model(config.model, device=device)
    data = load_data(config.data, tokenizer)
    metrics = held_out_metrics(model, tokenizer, data.eval, data.records, config)
    settings = LatencySettings(**spec["latency"])
    params = parameter_count(model)
    return {
        "trainable_params": 0,
        "base_params": params,
        "inference_params": params,
        "eval_peak_mb": peak_memory_mb(_device()),
        "file_bytes": files_bytes(resolve_model_path(config.model)),
        "latency": measure_latency(model, tokenizer, settings).to_dict(),
        **_quality(metrics),
    }


def run_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """The row for `spec`: its numbers with status "ok", or status "failed" and the error."""
    label = spec["label"]
    started = time.perf_counter()
    try:
        if label in os.environ.get(FAIL_ENV, "").split(","):
            raise RuntimeError(f"made to fail on purpose ({FAIL_ENV}={label})")
        numbers = base_row(spec) if spec["kind"] == "base" else train_row(spec)
        row = {"label": label, "status": "ok", **numbers}
    except Exception as exc:  # the row reports any failure; the other methods still run
        row = {"label": label, "status": "failed", "error": f"{type(exc).__name__}: {exc}"}
    row["wall_s"] = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    row["cpu_s"] = usage.ru_utime + usage.ru_stime  # the child's own CPU time, load-independent
    row["device"] = str(_device())
    return row


def main(argv: list[str] | None = None) -> int:
    """Run the spec file named on the command line; exit status 1 if the row failed."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m tilpass.compare.child SPEC.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(args[0]).read_text())
    row = run_spec(spec)
    if row["status"] != "ok":
        print(f"{row['label']}: {row['error']}", file=sys.stderr)
    atomic_write_bytes(Path(spec["result"]), (dumps_strict(row, indent=2) + "\n").encode())
    return 0 if row["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
