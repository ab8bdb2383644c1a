"""Output directories: a run claims one, and never mixes with another run there."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tilpass.run_dir import (
    RUN_FILE,
    OutputDirError,
    claim_output_dir,
    read_run_id,
    remove_run,
    run_contents,
)


def fake_run(out: Path, run_id: str | None, steps: tuple[int, ...] = (2, 4)) -> None:
    """A finished run's files: checkpoints (with their owner), an adapter, a config."""
    out.mkdir(parents=True, exist_ok=True)
    if run_id is not None:
        (out / RUN_FILE).write_text(json.dumps({"run_id": run_id}))
    for step in steps:
        checkpoint = out / f"checkpoint-{step}"
        checkpoint.mkdir()
        state = {"global_step": step, **({"run_id": run_id} if run_id else {})}
        (checkpoint / "trainer_state.json").write_text(json.dumps(state))
        (checkpoint / "trainable.safetensors").write_bytes(b"x")
    (out / "adapter").mkdir()
    (out / "config.yaml").write_text("model: m\n")


def test_an_empty_or_new_directory_is_claimed_with_a_new_id(tmp_path: Path) -> None:
    first = claim_output_dir(tmp_path / "new")
    assert read_run_id(tmp_path / "new") == first
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not a run's file")
    second = claim_output_dir(tmp_path / "mine")
    assert second != first and (tmp_path / "mine" / "notes.txt").exists()


def test_a_directory_with_another_run_is_refused_naming_what_is_there(tmp_path: Path) -> None:
    fake_run(tmp_path, "r1")
    with pytest.raises(OutputDirError) as caught:
        claim_output_dir(tmp_path)
    assert str(caught.value) == (
        f"output_dir {tmp_path} holds another run: run r1 (finished, adapter/ saved): adapter/, "
        "checkpoint-2/, checkpoint-4/, config.yaml, run.json. Pass --overwrite to delete it and "
        "start afresh, --resume auto to continue it, or choose another --output_dir"
    )
    assert claim_output_dir(tmp_path, resume="auto") == "r1"  # resuming keeps the run's id


def test_overwrite_removes_the_run_but_not_other_files(tmp_path: Path) -> None:
    fake_run(tmp_path, "r1")
    (tmp_path / "notes.txt").write_text("keep")
    (tmp_path / ".checkpoint-6.tmp-99").mkdir()  # debris of a crashed save
    new = claim_output_dir(tmp_path, overwrite=True)
    assert new != "r1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", RUN_FILE]
    with pytest.raises(OutputDirError, match="--overwrite deletes the run that --resume"):
        claim_output_dir(tmp_path, overwrite=True, resume="auto")


def test_leftovers_of_a_run_that_saved_nothing_are_replaced(tmp_path: Path) -> None:
    tmp_path.joinpath(RUN_FILE).write_text(json.dumps({"run_id": "failed"}))
    tmp_path.joinpath("config.yaml").write_text("model: m\n")
    assert claim_output_dir(tmp_path) != "failed"
    assert run_contents(tmp_path) == [RUN_FILE]


def test_checkpoints_without_run_ids_cannot_be_resumed(tmp_path: Path) -> None:
    fake_run(tmp_path, None)
    with pytest.raises(OutputDirError, match="without a run id"):
        claim_output_dir(tmp_path, resume="auto")


def test_resume_by_path_adopts_or_refuses_the_checkpoints_run(tmp_path: Path) -> None:
    fake_run(tmp_path / "old", "r1")
    checkpoint = str(tmp_path / "old" / "checkpoint-4")
    assert claim_output_dir(tmp_path / "elsewhere", resume=checkpoint) == "r1"
    fake_run(tmp_path / "other", "r2", steps=())
    with pytest.raises(OutputDirError, match="was written by run r1, but output_dir"):
        claim_output_dir(tmp_path / "other", resume=checkpoint)
    with pytest.raises(OutputDirError, match=r"not a complete checkpoint.*--resume auto"):
        claim_output_dir(tmp_path / "new", resume=str(tmp_path / "nope"))


def test_remove_run_goes_run_file_first(tmp_path: Path) -> None:
    fake_run(tmp_path, "r1")
    remove_run(tmp_path)
    assert list(tmp_path.iterdir()) == []
