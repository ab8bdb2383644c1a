"""The training loop's own guards, in process: run ids, resume with changed settings, NaN."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_train import assert_same, cfg, collate, make_items, tiny_lora, trainable
from tilpass.run_dir import OutputDirError, read_run_id
from tilpass.train import DivergenceError, lr_factor, train
from tilpass.train_checkpoints import CheckpointError


def events(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_fresh_run_refuses_a_directory_with_another_runs_checkpoints(tmp_path: Path) -> None:
    lines: list[str] = []
    train(tiny_lora(), make_items(), None, collate, cfg(max_steps=2, save_steps=1), tmp_path)
    first = read_run_id(tmp_path)
    with pytest.raises(OutputDirError, match="holds checkpoints of another run"):
        train(tiny_lora(), make_items(), None, collate, cfg(max_steps=2), tmp_path)
    assert read_run_id(tmp_path) == first  # the refused run did not take the directory
    # Resuming reads only the run's own checkpoints; another run's is reported and left alone.
    other = tmp_path.parent / "other"
    train(tiny_lora(), make_items(), None, collate, cfg(max_steps=3, save_steps=3), other)
    shutil.copytree(other / "checkpoint-3", tmp_path / "checkpoint-3")
    with pytest.raises(CheckpointError, match="does not overwrite another run's checkpoint"):
        train(
            tiny_lora(),
            make_items(),
            None,
            collate,
            cfg(max_steps=3, save_steps=1),
            tmp_path,
            resume="auto",
            log=lines.append,
        )
    assert lines[0] == f"note: checkpoint-3 in {tmp_path} belong to another run and are ignored"
    assert lines[1] == f"resumed from {tmp_path / 'checkpoint-2'} (step 2 of 3)"


def test_resume_applies_a_changed_learning_rate_and_length_like_a_straight_run(
    tmp_path: Path,
) -> None:
    items = make_items()
    straight = tiny_lora()
    train(straight, items, None, collate, cfg(max_steps=6, learning_rate=2e-2), tmp_path / "a")
    # The same run, stopped after 3 steps at another learning rate and length, then resumed
    # with the straight run's settings: from step 3 on it must follow the straight run's lr.
    resumed = tiny_lora()
    short = cfg(max_steps=3, save_steps=3, learning_rate=1e-2)
    train(resumed, items, None, collate, short, tmp_path / "b")
    lines: list[str] = []
    again = cfg(max_steps=6, learning_rate=2e-2)
    train(resumed, items, None, collate, again, tmp_path / "b", resume="auto", log=lines.append)
    assert lines == [
        f"resumed from {tmp_path / 'b' / 'checkpoint-3'} (step 3 of 6)",
        "settings changed since that checkpoint, applied from step 4 on: learning_rate 0.01 -> "
        "0.02, max_steps 3 -> 6, save_steps 3 -> 0",
    ]
    lr = {e["step"]: e["lr"] for e in events(tmp_path / "b") if e["event"] == "train"}
    straight_lr = {e["step"]: e["lr"] for e in events(tmp_path / "a") if e["event"] == "train"}
    assert [lr[s] for s in (4, 5, 6)] == [straight_lr[s] for s in (4, 5, 6)]
    assert lr[4] == 2e-2 * lr_factor(3, 6, 1, "cosine") > 0


def test_unchanged_settings_resume_bit_for_bit(tmp_path: Path) -> None:
    items = make_items()
    straight = tiny_lora(dropout=0.1)
    train(straight, items, None, collate, cfg(max_steps=6, weight_decay=0.1), tmp_path / "a")
    resumed = tiny_lora(dropout=0.1)
    c = cfg(max_steps=6, save_steps=2, weight_decay=0.1)
    train(resumed, items, None, collate, c, tmp_path / "b", callbacks=[_StopAt(4)])
    resumed = tiny_lora(dropout=0.1)
    train(resumed, items, None, collate, c, tmp_path / "b", resume="auto", log=lambda _: None)
    assert_same(trainable(straight), trainable(resumed))


class _StopAt:
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, state: object) -> None:
        state.should_stop = state.step >= self.step  # type: ignore[attr-defined]


def test_a_nonfinite_loss_stops_at_its_step_or_is_skipped(tmp_path: Path) -> None:
    model = tiny_lora()
    pattern = (
        r"^step ([234]): the training loss is \S+ and the gradient norm \S+; training diverged"
    )
    with pytest.raises(DivergenceError, match=pattern) as caught:
        train(model, make_items(), None, collate, cfg(learning_rate=1e30), tmp_path / "stop")
    step = int(re.match(pattern, str(caught.value)).group(1))  # type: ignore[union-attr]
    last = events(tmp_path / "stop")[-1]
    assert last["event"] == "nonfinite" and last["step"] == step
    assert None in (last["loss"], last["grad_norm"])  # the non-finite one, as strict JSON
    assert not list((tmp_path / "stop").glob("checkpoint-*"))

    # Skipping: a loss term that is NaN on the second step only; that step's update is dropped.
    class NaNOnce:
        name = "nan_once"

        def loss_term(self, step: int) -> torch.Tensor | None:
            return torch.tensor(float("nan")) if step == 1 else None

    model = tiny_lora()
    c = cfg(on_nonfinite="skip", save_steps=1, save_total_limit=0)
    result = train(model, make_items(), None, collate, c, tmp_path / "skip", callbacks=[NaNOnce()])
    assert result.global_step == 4
    log = events(tmp_path / "skip")
    assert [e["step"] for e in log if e["event"] == "skipped_step"] == [2]
    assert log[-1]["skipped_steps"] == 1
    assert [e["step"] for e in log if e["event"] == "train"] == [1, 2, 3, 4]
    assert next(e for e in log if e["event"] == "train" and e["step"] == 2)["loss"] is None
    # The skipped step changed nothing: its checkpoint holds the weights of the one before.
    one = load_file(tmp_path / "skip" / "checkpoint-1" / "trainable.safetensors")
    two = load_file(tmp_path / "skip" / "checkpoint-2" / "trainable.safetensors")
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    assert all(torch.isfinite(p).all() for p in trainable(model).values())
