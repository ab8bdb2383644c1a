"""Data-parallel and sharded training: real 2-process gloo runs of the CLI on CPU.

A 2-rank run with 2 examples per rank must train the same adapter, within float tolerance,
as one process with 4 examples per step and the same seed; so must FSDP2 (``--shard``).
Checkpoints move between layouts: one process resumes a 2-rank DDP or FSDP2 checkpoint, and
2 FSDP2 ranks resume a 1-process one, to the adapter of the uninterrupted run. A killed rank
ends the run with a message naming it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_cli import chat, cli_env, common, save_tiny_model, write_data
from tilpass.distributed import DataParallel, DistributedError, World, choose_backend, rank_slice

# 25 examples in global micro-batches of 4: step 7 trains one example, on rank 0 alone (rank
# 1 runs a stand-in with its loss masked out); step 8 starts the second epoch.
STEPS = 8  # optimizer steps; a checkpoint every 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(tiny model dir, train file of 25 rows, held-out file)."""
    root = tmp_path_factory.mktemp("dist")
    train, test = write_data(root)
    with train.open("a") as f:
        f.write(json.dumps(chat("neurology", 24)) + "\n")
    return save_tiny_model(root / "model"), train, test


def train_args(setup: tuple[Path, Path, Path], out: Path, batch: int, *extra: str) -> list[str]:
    model, train, test = setup
    args = common(model, train, test, out, steps=STEPS)
    i = args.index("--training.batch_size")
    args[i + 1] = str(batch)
    i = args.index("--data.eval")
    del args[i : i + 2]  # no evaluation: these tests are about the training steps
    args += ["--training.keep_freed_memory", "false"]  # no process-wide malloc change here
    return [
        "train",
        *args,
        "--training.save_steps",
        "2",
        "--lora.init_lora_weights",
        "false",
        *extra,
    ]


def in_process(args: list[str]) -> None:
    """`tilpass` in this process (a world of one), its output discarded."""
    from tilpass.cli import main

    with contextlib.redirect_stdout(io.StringIO()):
        assert main(args) == 0


def launch(args: list[str], cwd: Path) -> subprocess.Popen[str]:
    """`tilpass *args` in a subprocess; CPU-only, a short collective timeout."""
    env = {**cli_env(), "CUDA_VISIBLE_DEVICES": "", "TILPASS_DIST_TIMEOUT_S": "60"}
    return subprocess.Popen(
        [sys.executable, "-m", "tilpass", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen[str], timeout: float = 300) -> tuple[str, str]:
    """A launched run's (stdout, stderr) once it ends; past `timeout` its launcher and ranks
    are stopped (no orphans left running) and the test fails with the run's output."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        ranks = [rank_pid(proc.pid, r) for r in range(2)]
        proc.terminate()  # the launcher stops its ranks
        try:
            stdout, stderr = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            for pid in filter(None, ranks):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            proc.kill()
            stdout, stderr = proc.communicate()
        pytest.fail(
            f"the run did not end within {timeout:g} s:\n{stdout[-2000:]}\n{stderr[-3000:]}"
        )


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter" / "adapter_model.safetensors")


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.fixture(scope="module")
def reference(setup: tuple[Path, Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One process, 4 examples per step: ``run/`` (cosine schedule) and ``constant/``."""
    root = tmp_path_factory.mktemp("one")
    keep = ["--training.save_total_limit", "0"]
    in_process([*train_args(setup, root / "run", 4), *keep])
    constant = ["--training.lr_scheduler", "constant", *keep]
    in_process([*train_args(setup, root / "constant", 4), *constant])
    return root


def test_rank_slices_cover_the_global_batch_without_overlap() -> None:
    batch = [7, 3, 9, 1, 4]
    parts = [rank_slice(batch, r, 2) for r in range(2)]
    assert [p.indices for p in parts] == [[7, 3, 9], [1, 4]]
    assert all(p.counts for p in parts)
    lone = [rank_slice([5], r, 2) for r in range(2)]
    assert (lone[0].indices, lone[0].counts) == ([5], True)
    assert lone[1].counts is False  # a stand-in example, its loss masked out


def test_two_ranks_equal_one_process_and_resume_on_one(
    setup: tuple[Path, Path, Path], reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "two"
    proc = launch([*train_args(setup, out, 2), "--nproc", "2"], tmp_path)
    stdout, stderr = finish(proc)
    assert proc.returncode == 0, stderr[-3000:]
    assert "world size 2 (gloo, DDP): effective batch size 4 (2 per rank x 2 ranks" in stdout
    assert stdout.count("adapter saved in") == 1  # rank 0 prints, logs and writes
    events = (out / "metrics.jsonl").read_text().splitlines()
    assert sum('"event": "start"' in e for e in events) == 1
    want = adapter(reference / "run")
    assert_same(adapter(out), want)
    assert any(bool(t.abs().max() > 0) for k, t in want.items() if "lora_B" in k)
    # Resume the 2-rank run's step-6 checkpoint with one process and 4 examples per step.
    one = copy_run(out, "checkpoint-6", tmp_path / "resumed")
    in_process([*train_args(setup, one, 4), "--resume", "auto"])
    assert_same(adapter(one), want)


def rank_pid(parent: int, rank: int) -> int | None:
    """The pid of the child of `parent` that runs as `rank` (from its environment)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (entry / "environ").read_bytes().split(b"\0")
            if ppid == parent and f"RANK={rank}".encode() in env:
                return int(entry.name)
    return None


def test_fsdp2_trains_as_one_process_and_a_killed_rank_ends_the_run_naming_it(
    setup: tuple[Path, Path, Path], reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "sharded"
    args = train_args(setup, out, 2, "--training.max_steps", "100000", "--nproc", "2", "--shard")
    args += ["--training.lr_scheduler", "constant", "--training.save_total_limit", "0"]
    proc = launch(args, tmp_path)
    deadline = time.monotonic() + 240
    while not (out / "checkpoint-2").is_dir():  # training is under way on both ranks
        if proc.poll() is not None or time.monotonic() > deadline:
            _, stderr = finish(proc, 1)  # a run still going past the deadline is stopped
            pytest.fail(f"the run ended before its second checkpoint:\n{stderr[-3000:]}")
        time.sleep(0.2)
    pid = rank_pid(proc.pid, 1)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    stdout, stderr = finish(proc, 120)
    assert time.monotonic() - killed < 90  # never a hang
    assert proc.returncode == 1, stderr[-3000:]
    assert f"tilpass train: error: rank 1 (pid {pid}) was killed by SIGKILL" in stderr, stderr
    assert "world size 2 (gloo, FSDP2)" in stdout
    # FSDP2's sharded parameters and AdamW states, gathered whole into the checkpoint, are
    # those of one process with the same global batch (constant schedule on both sides).
    for name in ("trainable.safetensors", "optimizer.safetensors"):
        want = load_file(reference / "constant" / "checkpoint-2" / name)
        assert_same(load_file(out / "checkpoint-2" / name), want)
    # The killed sharded run resumes on one process (4 examples per step) to the adapter of
    # the uninterrupted one.
    one = copy_run(out, "checkpoint-2", tmp_path / "resumed")
    constant = ["--training.lr_scheduler", "constant", "--resume", "auto"]
    in_process([*train_args(setup, one, 4), *constant])
    assert_same(adapter(one), adapter(reference / "constant"))


def copy_run(out: Path, checkpoint: str, to: Path) -> Path:
    """A new output directory holding run `out`'s `checkpoint` (and its run files) only."""
    to.mkdir()
    for name in (checkpoint, "run.json", "config.yaml", "metrics.jsonl"):
        subprocess.run(["cp", "-r", str(out / name), str(to / name)], check=True)
    return to


def test_a_one_process_checkpoint_resumes_on_two_sharded_ranks(
    setup: tuple[Path, Path, Path], reference: Path, tmp_path: Path
) -> None:
    out = copy_run(reference / "run", "checkpoint-4", tmp_path / "sharded")
    args = [*train_args(setup, out, 2), "--nproc", "2", "--shard", "--resume", "auto"]
    proc = launch(args, tmp_path)
    stdout, stderr = finish(proc)
    assert proc.returncode == 0, stderr[-3000:]
    assert "world size 2 (gloo, FSDP2)" in stdout
    assert f"resumed from {out / 'checkpoint-4'} (step 4 of {STEPS})" in stdout
    assert_same(adapter(out), adapter(reference / "run"))


def test_the_failure_message_names_the_cause_not_the_ranks_stopped_after_it() -> None:
    from types import SimpleNamespace

    from tilpass.distributed import LOST_RANK_EXIT
    from tilpass.distributed_launch import failure_message, without_nproc

    failures = {
        0: SimpleNamespace(exitcode=-signal.SIGTERM, timestamp=1, pid=10),
        1: SimpleNamespace(exitcode=-signal.SIGKILL, timestamp=2, pid=11),
        2: SimpleNamespace(exitcode=LOST_RANK_EXIT, timestamp=0, pid=12),
    }
    lines = failure_message(failures).splitlines()
    assert lines[0].startswith("tilpass train: error: rank 1 (pid 11) was killed by SIGKILL")
    assert lines[1:] == [
        "  also: rank 2 (pid 12) stopped: it lost contact with another rank",
        "  also: rank 0 (pid 10) was killed by SIGTERM",
    ]
    assert without_nproc(["train", "c.yaml", "--nproc", "2", "--nproc=3", "--shard"]) == [
        "train",
        "c.yaml",
        "--shard",
    ]


def test_a_gpu_backend_without_gpus_is_a_clear_error(
    setup: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DistributedError, match="--backend nccl needs CUDA GPUs"):
        choose_backend("nccl")
    assert choose_backend("auto") == "gloo"
    from tilpass.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main([*train_args(setup, tmp_path / "o", 2), "--nproc", "2", "--backend", "nccl"])
    assert code == 2
    assert "tilpass train: error: --backend nccl needs CUDA GPUs" in err.getvalue()
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_one_process_banner_and_batch() -> None:
    from tilpass.train_config import TrainConfig

    config = TrainConfig(batch_size=3, gradient_accumulation_steps=2)
    assert DataParallel().global_config(config).batch_size == 3
    two = DataParallel(World(rank=1, world_size=2, backend="gloo"))
    assert two.global_config(config).batch_size == 6
    assert "effective batch size 12 (3 per rank x 2 ranks x 2 accumulation)" in two.banner(config)
    assert not two.is_main
