"""``tilpass train CONFIG --nproc N``: the same command again under ``torch.distributed.run``.

On one machine, ``--nproc N`` is shorthand for ``torchrun --standalone --nproc-per-node N -m
tilpass train CONFIG``: this module starts PyTorch's own launcher in-process (no home-made
process management), and when a rank fails it names that rank, its exit code or signal,
instead of the launcher's traceback. The launcher stops the other ranks at once, so a dead
rank never leaves the run hanging.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Sequence
from typing import Any


def without_nproc(argv: Sequence[str]) -> list[str]:
    """``argv`` with ``--nproc N`` / ``--nproc=N`` removed (the ranks must not relaunch)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def describe_failure(rank: int, exitcode: int, pid: int) -> str:
    """What happened to a rank, in words: its exit code, or the signal that killed it."""
    from tilpass.distributed import LOST_RANK_EXIT

    if exitcode < 0:
        try:
            how = f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            how = f"was killed by signal {-exitcode}"
    elif exitcode == LOST_RANK_EXIT:
        how = "stopped: it lost contact with another rank"
    else:
        how = f"exited with code {exitcode}"
    return f"rank {rank} (pid {pid}) {how}"


def launch(nproc: int, argv: Sequence[str]) -> int:
    """Run ``tilpass *argv`` (minus ``--nproc``) on ``nproc`` local ranks; the exit status."""
    if nproc < 1:
        print(f"tilpass: error: --nproc must be at least 1, got {nproc}", file=sys.stderr)
        return 2
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(
        [
            "--standalone",
            f"--nproc-per-node={nproc}",
            "--max-restarts=0",
            "--module",
            "tilpass",
            *without_nproc(argv),
        ]
    )
    try:
        run(args)
    except ChildFailedError as exc:
        print(failure_message(exc.failures), file=sys.stderr)
        return 1
    return 0


def failure_message(failures: dict[int, Any]) -> str:
    """The launcher's failures as one message naming the first rank that failed."""
    from tilpass.distributed import LOST_RANK_EXIT

    # A rank that stopped because it lost another, or that the launcher stopped (SIGTERM),
    # is not the cause: name the others first.
    after_effects = (LOST_RANK_EXIT, -signal.SIGTERM)
    ordered = sorted(
        failures.items(),
        key=lambda kv: (kv[1].exitcode in after_effects, kv[1].timestamp, kv[0]),
    )
    rank, first = ordered[0]
    lines = [
        f"tilpass train: error: {describe_failure(rank, first.exitcode, first.pid)}; "
        "the launcher stopped the other ranks. Its own output above says why; continue "
        "from the last checkpoint with --resume auto"
    ]
    lines += [f"  also: {describe_failure(r, f.exitcode, f.pid)}" for r, f in ordered[1:]]
    return "\n".join(lines)
