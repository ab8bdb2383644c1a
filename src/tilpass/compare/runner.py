"""Run a comparison: the shared settings, one child process per row, the rows collected.

Every row gets the same model, data files, data order, seed, batch size and budget; only the
method, its settings and its learning rate (`tilpass.compare.plan.DEFAULTS`) differ. The base
model's row runs first. Each child writes its log to `OUT/logs/<label>.log` and its numbers
to `OUT/results/<label>.json`; a child that dies without writing them becomes a failed row
whose error is the last line of its log.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tilpass.adapter_files import atomic_write_bytes
from tilpass.compare.measure import LatencySettings
from tilpass.compare.plan import UNAVAILABLE, Budget, MethodPlan, is_available, run_values
from tilpass.json_files import dumps_strict

MINUTES_STEP_CAP = 100_000
"""`max_steps` of a run with a time budget: the time limit stops it, not the step count."""


@dataclass
class Settings:
    """What every row shares.

    Attributes:
        model: the base model (default model name or a local Hugging Face directory).
        train / eval: the training file and the held-out file every row is scored on.
        budget: optimizer steps or minutes per method.
        out: the output directory (runs, logs, results, table, charts).
        batch_size / max_length / seed: the data's batching, truncation and order.
        eval_samples: held-out records scored by exact match (0: all); loss uses all.
        latency: the inference timing settings.
    """

    model: str
    train: str
    eval: str
    budget: Budget
    out: Path
    batch_size: int = 8
    max_length: int = 128
    seed: int = 42
    eval_samples: int = 50
    latency: LatencySettings = field(default_factory=LatencySettings)

    def steps(self) -> int:
        """`max_steps` of every run."""
        return self.budget.steps or MINUTES_STEP_CAP

    def config_values(self, label: str) -> dict[str, Any]:
        """The `tilpass train` config every row shares (the plan adds its method's part)."""
        steps = self.budget.steps
        return {
            "model": self.model,
            "output_dir": str(self.out / "runs" / label),
            "eval_before": False,
            "data": {"train": self.train, "eval": self.eval, "max_length": self.max_length},
            "training": {
                "batch_size": self.batch_size,
                "max_steps": self.steps(),
                "warmup_steps": max(1, steps // 10) if steps else 5,
                "lr_scheduler": "cosine" if steps else "constant",
                "logging_steps": max(1, steps // 5) if steps else 1,
                "seed": self.seed,
                "eval_batch_size": 25,
                "eval_max_new_tokens": 8,
                "eval_generation_samples": self.eval_samples,
                "progress_bar": False,
            },
        }


def spec_for(settings: Settings, plan: MethodPlan | None) -> dict[str, Any]:
    """The child's spec for one row (`plan` None: the base model's row)."""
    label = "base" if plan is None else plan.label
    values = settings.config_values(label)
    if plan is not None:
        own = run_values(plan, settings.steps())
        values["training"] |= own.pop("training")
        values |= own
    return {
        "label": label,
        "kind": "base" if plan is None else "method",
        "config": values,
        "latency": asdict(settings.latency),
        "merged_row": plan is not None and plan.merged_row,
        "budget_minutes": settings.budget.minutes,
        "result": str(settings.out / "results" / f"{label}.json"),
    }


def run_child(spec: dict[str, Any], out: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one row's child process; its result, or a failed row from its log's last line."""
    label = spec["label"]
    for sub in ("specs", "logs", "results"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    spec_path, log_path = out / "specs" / f"{label}.json", out / "logs" / f"{label}.log"
    result_path = Path(spec["result"])
    result_path.unlink(missing_ok=True)
    atomic_write_bytes(spec_path, (dumps_strict(spec, indent=2) + "\n").encode())
    with log_path.open("w") as log:
        proc = subprocess.run(
            [sys.executable, "-m", "tilpass.compare.child", str(spec_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            check=False,
        )
    _drop_checkpoints(out / "runs" / label)
    if result_path.is_file():
        return json.loads(result_path.read_text())
    lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    last = lines[-1] if lines else "no output"
    return {"label": label, "status": "failed", "error": f"exit status {proc.returncode}: {last}"}


def _drop_checkpoints(run_dir: Path) -> None:
    """Remove the run's resumable checkpoints: the comparison keeps only the saved result."""
    for checkpoint in run_dir.glob("checkpoint-*"):
        shutil.rmtree(checkpoint, ignore_errors=True)


def unavailable_row(plan: MethodPlan) -> dict[str, Any]:
    """The row of a method this version of tilpass does not register."""
    return {
        "label": plan.label,
        "status": UNAVAILABLE,
        "error": f"method {plan.method!r}: {UNAVAILABLE}",
    }


def run_all(
    settings: Settings, plans: list[MethodPlan], env: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    """The base model's row, then one row per plan, with a progress bar across the rows."""
    from tqdm.auto import tqdm

    rows: list[dict[str, Any]] = []
    todo: list[MethodPlan | None] = [None, *plans]
    bar = tqdm(total=len(todo), desc="compare", unit="method")
    for plan in todo:
        label = "base" if plan is None else plan.label
        bar.set_postfix_str(label)
        if plan is not None and not is_available(plan):
            row = unavailable_row(plan)
        else:
            row = run_child(spec_for(settings, plan), settings.out, env)
        rows.append(row)
        bar.write(f"{label}: {row['status']}" + (f" ({row['error']})" if "error" in row else ""))
        bar.update(1)
    bar.close()
    return rows


def split_data(data: str, out: Path, seed: int, fraction: float = 0.1) -> tuple[str, str]:
    """Hold out a shuffled `fraction` (1 to 100 records) of `data` as the held-out split.

    The records are written as JSONL into `OUT/data/` (train.jsonl, heldout.jsonl); the
    shuffle follows `seed`, so a rerun holds out the same records.
    """
    from tilpass.data import load_records

    records = load_records(data)[0]
    if len(records) < 2:
        raise ValueError(f"--data {data}: {len(records)} record(s); need at least 2 to hold out")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    held = max(1, min(100, round(fraction * len(records))))
    folder = out / "data"
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "train.jsonl", folder / "heldout.jsonl"
    for path, part in zip(paths, (order[held:], order[:held]), strict=True):
        body = "".join(json.dumps(records[i], ensure_ascii=False) + "\n" for i in part)
        atomic_write_bytes(path, body.encode())
    return str(paths[0]), str(paths[1])
