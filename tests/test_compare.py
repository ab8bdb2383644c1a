"""`tilpass compare` end to end on a tiny random model, in a real subprocess, and its parts.

One run over every method (one of them made to fail on purpose) is shared by the tests
below; each checks that a number in the table is a measurement: it matches the files on
disk, it orders the methods as their construction says it must, or it is refused when absent.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from safetensors import safe_open

from tests.test_cli import cli_env, save_tiny_model, write_data
from tilpass.cli import main
from tilpass.compare.child import FAIL_ENV, TimeLimit
from tilpass.compare.plan import (
    DEFAULTS,
    UNAVAILABLE,
    Budget,
    CompareError,
    is_available,
    parse_methods,
)
from tilpass.compare.recommend import recommendations
from tilpass.compare.report import COLUMNS, CSV_KEYS
from tilpass.compare.runner import Settings, spec_for, split_data
from tilpass.train_hooks import TrainState

FAILING = "pfeiffer"


class Compared:
    """The shared run: its output directory, its terminal output, and the CSV rows by method."""

    def __init__(self, out: Path, stdout: str) -> None:
        self.out = out
        self.stdout = stdout
        with (out / "compare.csv").open() as f:
            reader = csv.DictReader(f)
            self.header = reader.fieldnames
            self.rows = {row["method"]: row for row in reader}

    def number(self, method: str, key: str) -> float:
        return float(self.rows[method][key])


@pytest.fixture(scope="module")
def compared(tmp_path_factory: pytest.TempPathFactory) -> Compared:
    root = tmp_path_factory.mktemp("compare")
    model = save_tiny_model(root / "model")
    train, test = write_data(root)
    out = root / "out"
    args = ["--model", str(model), "--data", str(train), "--eval", str(test), "--out", str(out)]
    args += ["--budget-steps", "2", "--batch-size", "4", "--eval-samples", "2", "--repeats", "1"]
    proc = subprocess.run(
        [sys.executable, "-m", "tilpass.cli", "compare", *args],
        cwd=root,
        env={**cli_env(), FAIL_ENV: FAILING, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Compared(out, proc.stdout)


def test_every_method_has_a_row_with_every_column(compared: Compared) -> None:
    assert compared.header == CSV_KEYS
    expected = ["base model", *DEFAULTS]
    methods = list(compared.rows)
    assert [m for m in methods if not m.endswith("(merged)")] == expected
    merged = [m for m in methods if m.endswith("(merged)")]
    assert merged == [f"{p.label} (merged)" for p in DEFAULTS.values() if p.merged_row]
    for label, plan in DEFAULTS.items():
        status = compared.rows[label]["status"]
        if label == FAILING:
            assert status == "failed" and "on purpose" in compared.rows[label]["error"]
        elif is_available(plan):
            assert status == "ok", compared.rows[label]["error"]
        else:
            assert status == UNAVAILABLE
    markdown = (compared.out / "compare.md").read_text()
    assert "| " + " | ".join(c.header for c in COLUMNS) + " |" in markdown
    assert COLUMNS[2].header in compared.stdout and "One task:" in compared.stdout
    for chart in ("quality_vs_params.png", "inference_overhead.png", "peak_memory.png"):
        assert (compared.out / chart).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _measured(compared: Compared) -> list[str]:
    return [m for m, row in compared.rows.items() if row["status"] == "ok" and m != "base model"]


def test_numbers_are_measurements(compared: Compared) -> None:
    """Positive, finite numbers in every measured row; counts and sizes match the saved files."""
    for method in _measured(compared):
        for key in ("train_peak_mb", "train_tokens_per_s", "decode_b1_ms", "prefill_128_ms"):
            value = compared.number(method, key)
            assert value > 0 and math.isfinite(value), (method, key)
        assert math.isfinite(compared.number(method, "eval_loss"))
        if method.endswith("(merged)"):
            continue
        saved = compared.out / "runs" / method / ("model" if method == "full" else "adapter")
        files = sorted(saved.glob("*.safetensors"))
        assert compared.number(method, "file_bytes") == sum(f.stat().st_size for f in files)
        if method != "full":  # an adapter file holds the trained tensors
            with safe_open(files[0], "pt") as f:
                numel = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118
            trained = compared.number(method, "trainable_params")
            if method == "adalora":  # trains init_r triplets, keeps (and saves) the pruned set
                assert 0 < numel < trained, method
            else:
                assert trained == numel, method


def test_full_fine_tuning_trains_and_stores_the_most(compared: Compared) -> None:
    others = [m for m in _measured(compared) if m != "full"]
    full_params = compared.number("full", "trainable_params")
    assert full_params == compared.number("base model", "inference_params")
    assert compared.number("full", "trainable_pct") == 100.0
    for method in others:
        assert full_params > compared.number(method, "trainable_params"), method
        assert compared.number("full", "file_bytes") > compared.number(method, "file_bytes")


def test_merged_lora_has_no_more_inference_parameters_than_the_base(compared: Compared) -> None:
    base = compared.number("base model", "inference_params")
    assert compared.number("lora (merged)", "inference_params") <= base
    assert compared.number("lora", "inference_params") > base  # unmerged: A and B on top


def test_recommendations_follow_the_numbers() -> None:
    def row(method: str, match: float, peak: float, **extra: Any) -> dict[str, Any]:
        numbers = {"exact_match": match, "eval_loss": 1.0, "train_peak_mb": peak}
        return {"method": method, "status": "ok", "file_mb": 1.0, **numbers, **extra}

    rows = [row("lora", 0.5, 900, decode_b1_x=1.2), row("ia3", 0.46, 700), row("full", 0.9, 2000)]
    rows.append(row("adalora", 0.0, 600))  # least memory, but did not learn: passed over
    one, many, tight = recommendations(rows)
    assert one.startswith("One task: full") and "90.0%" in one
    assert many.startswith("Many tasks on one server: lora adapters")
    assert tight.startswith("Tight memory: ia3") and "700 MB" in tight
    assert "adalora took less memory but reached under 50% of the best quality" in tight
    rows[1]["exact_match"] = 0.44  # under half the best: lora is the lightest usable row
    assert recommendations(rows)[2].startswith("Tight memory: lora")
    rows[1]["exact_match"] = 0.95
    rows.pop()
    assert recommendations(rows)[0].startswith("One task: ia3")
    rows.append(row("ia3 (merged)", 0.95, 700, merged=True, decode_b1_x=1.0))
    assert "ia3, merged into the base" in recommendations(rows)[0]


def test_bad_requests_are_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(CompareError, match=r"unknown method.*lorax.*choose from"):
        parse_methods("lora,lorax")
    missing = str(tmp_path / "none.jsonl")
    code = main(["compare", "--data", missing, "--out", str(tmp_path / "out")])
    assert code == 2 and "--data" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert main(["compare", "--batch-size", "0", "--out", str(tmp_path / "out")]) == 2
    assert "--batch-size must be >= 1, got 0" in capsys.readouterr().err
    (tmp_path / "compare.md").write_text("old")
    assert main(["compare", "--out", str(tmp_path)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_held_out_split_is_fixed_by_the_seed(tmp_path: Path) -> None:
    train, _ = write_data(tmp_path)
    first = [Path(p).read_text() for p in split_data(str(train), tmp_path / "a", seed=3)]
    again = [Path(p).read_text() for p in split_data(str(train), tmp_path / "b", seed=3)]
    assert first == again
    held = [json.loads(line) for line in first[1].splitlines()]
    kept = [json.loads(line) for line in first[0].splitlines()]
    assert len(held) == 2 and len(kept) == 22 and not any(r in kept for r in held)


def test_every_row_shares_data_order_seed_and_budget(tmp_path: Path) -> None:
    settings = Settings("m", "train.jsonl", "test.jsonl", Budget(steps=7), tmp_path)
    specs = [spec_for(settings, None)] + [spec_for(settings, p) for p in DEFAULTS.values()]
    shared = {"model", "data", "eval_before"}
    first = specs[0]["config"]
    for spec in specs[1:]:
        config = spec["config"]
        assert {k: config[k] for k in shared} == {k: first[k] for k in shared}
        training = dict(config["training"])
        assert training.pop("learning_rate") == DEFAULTS[spec["label"]].learning_rate
        assert training == first["training"] and training["max_steps"] == 7
    assert specs[1]["merged_row"] and specs[1]["config"]["lora"]["r"] == 8
    assert specs[2]["config"]["quantize"] == "nf4"  # qlora: LoRA over an NF4 base


def test_time_budget_stops_the_loop_after_its_minutes() -> None:
    limit = TimeLimit(0.0)
    state = TrainState(step=1, max_steps=10, epoch=0, loss=1.0, lr=1e-3)
    limit.on_step_end(state)  # the clock starts after the first step
    assert not state.should_stop
    limit.on_step_end(state)
    assert state.should_stop
    with pytest.raises(CompareError, match="exactly one budget"):
        Budget(steps=3, minutes=1.0)
