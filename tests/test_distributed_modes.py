"""Packing and QLoRA on several ranks: a real 2-process gloo run of the CLI on CPU.

A 2-rank run must train the same adapter, within float tolerance, as one process with the
same global batch and seed, with ``data.packing`` (each rank packs its own share of the
step's examples), length grouping and gradient accumulation, over a 4-bit NF4 base (QLoRA
under DDP). How a packed step is split and kept in step across ranks is checked on its own.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

from tests.test_cli import chat, save_tiny_model, write_data
from tests.test_distributed import adapter, assert_same, finish, in_process, launch, train_args
from tilpass.data.packing import Batching, BatchPlan
from tilpass.distributed import DataParallel, World

# Rows of at most 80 tokens (examples have 36 to 43), 2 micro-batches per step: with seed 42
# the ranks' shares of 2 of the 8 steps pack into different numbers of micro-batches, so a
# rank runs a stand-in.
PACKED_QLORA = [
    "--data.packing",
    "true",
    "--data.group_by_length",
    "true",
    "--data.max_length",
    "80",
    "--training.gradient_accumulation_steps",
    "2",
    "--quantize",
    "nf4",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(tiny model dir with hidden size 64, for 4-bit blocks; train file of 25 rows;
    held-out file)."""
    root = tmp_path_factory.mktemp("dist-modes")
    train, test = write_data(root)
    with train.open("a") as f:
        f.write(json.dumps(chat("neurology", 24)) + "\n")
    return save_tiny_model(root / "model", hidden_size=64), train, test


def two_ranks(args: list[str], cwd: Path) -> str:
    """`tilpass *args --nproc 2`; its standard output (the run must succeed)."""
    proc = launch([*args, "--nproc", "2"], cwd)
    stdout, stderr = finish(proc)
    assert proc.returncode == 0, stderr[-3000:]
    return stdout


def assert_trained(weights: dict[str, torch.Tensor]) -> None:
    """Some LoRA B is non-zero: the comparison is not between two untrained adapters."""
    assert any(bool(t.abs().max() > 0) for k, t in weights.items() if "lora_B" in k)


class Examples:
    """A dataset of token lists of the given lengths (all labels targets)."""

    def __init__(self, lengths: list[int]) -> None:
        self.rows = [{"input_ids": [3] * n, "labels": [3] * n} for n in lengths]
        self.pad_token_id = 0

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.rows[i]


def test_packed_steps_split_the_examples_by_rank_and_keep_the_ranks_in_step() -> None:
    plan = BatchPlan(Examples([30, 30, 30, 30, 60, 8]), dict, 4, 0, Batching(True, False, 64))
    ranks = [DataParallel(World(rank=r, world_size=2, backend="gloo")) for r in range(2)]
    # Rank 0 packs examples 0-2 (90 tokens: 2 rows), rank 1 examples 3-5 (98 tokens: 2 rows,
    # the 60 alone), 2 rows per micro-batch: one micro-batch each.
    step = [[0, 1, 2, 3], [4, 5]]
    got = [dp.packed_step(step, plan) for dp in ranks]
    assert [len(b) for b in got] == [1, 1]
    targets = [int((b["labels"] != -100).sum()) for bs in got for b in bs]
    assert targets == [3 * 29, 29 + 59 + 7]  # each example's first label is no target
    # Rank 0 packs one row (60 + 2 + 2 tokens), rank 1 three (2 micro-batches): rank 0 adds
    # a one-example stand-in with its loss masked, so both run two forwards.
    plan = BatchPlan(Examples([60, 2, 2, 60, 60, 60]), dict, 4, 0, Batching(True, False, 64))
    got = [dp.packed_step([[0, 1, 2, 3, 4, 5]], plan) for dp in ranks]
    assert [len(b) for b in got] == [2, 2]
    assert int((got[0][0]["labels"] != -100).sum()) == 59 + 1 + 1
    stand_in = got[0][1]
    assert bool((stand_in["labels"] == -100).all()) and not bool(stand_in["real_mask"].any())
    assert [int((b["labels"] != -100).sum()) for b in got[1]] == [59 + 59, 59]
    # A step with one example: rank 1 runs it as a stand-in, its loss masked out.
    got = [dp.packed_step([[4]], plan) for dp in ranks]
    assert [int((b[0]["labels"] != -100).sum()) for b in got] == [59, 0]


def test_packed_qlora_run_on_two_ranks_equals_one_process(
    setup: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """Packing, length grouping and gradient accumulation over an NF4 base (one launch for
    both: a 2-rank run costs seconds of start-up); some steps' shares pack unevenly."""
    one, two = tmp_path / "one", tmp_path / "two"
    in_process([*train_args(setup, one, 4), *PACKED_QLORA])
    stdout = two_ranks([*train_args(setup, two, 2), *PACKED_QLORA], tmp_path)
    assert "world size 2 (gloo, DDP): effective batch size 8 (2 per rank x 2 ranks x 2" in stdout
    assert "batching: packed (length-grouped order" in stdout
    assert "base quantized to 4-bit NF4" in stdout
    want = adapter(one)
    assert_trained(want)
    assert_same(adapter(two), want)


def test_sharding_a_quantized_base_is_refused_before_launch(
    setup: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    from tilpass.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main([*train_args(setup, tmp_path / "o", 2), "--quantize", "nf4", "--shard"])
    assert code == 2
    assert "tilpass train: error: --shard cannot shard a quantized base" in err.getvalue()
    assert not (tmp_path / "o").exists()  # refused before anything was written
