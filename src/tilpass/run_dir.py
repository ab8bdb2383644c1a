"""A run's output directory: which run it holds, and never mixing two runs in it.

A run gets an id when it starts (`new_run_id`), written to `run.json` in its output directory
and into every checkpoint it saves. `claim_output_dir` decides, before anything is loaded,
whether a new run may use a directory: an empty one (or one whose earlier run saved nothing
worth keeping) is taken; one holding another run is refused, with a message naming what is
there, unless the user asks to `--overwrite` it (its files are removed first) or to
`--resume` it (the run keeps its id). Because resume and checkpoint rotation only touch
checkpoints that carry the run's id, no mix of two runs can ever be resumed or saved as one.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from datetime import datetime, timezone
from pathlib import Path

from tilpass.adapter_files import atomic_write_bytes
from tilpass.errors import TilpassError
from tilpass.json_files import dumps_strict
from tilpass.train_checkpoints import CHECKPOINT_RE, CheckpointError, list_checkpoints, state_of

RUN_FILE = "run.json"
SAVED_DIRS = ("adapter", "model")  # what a finished run leaves behind
RUN_FILES = ("config.yaml", "metrics.jsonl", "result.json", "loss.png", RUN_FILE)
# Hidden debris of an atomic write, save or removal that crashed half-way.
_DEBRIS_RE = re.compile(r"^\.(adapter|model|checkpoint-\d+|run)\.(tmp|old|deleting|removing)-")


class OutputDirError(TilpassError, ValueError):
    """An output directory that holds another run, or whose run cannot be told."""


def new_run_id() -> str:
    """A new run's id: its start time (UTC) and random bits, unique for practical purposes."""
    return f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{secrets.token_hex(4)}"


def read_run_id(output_dir: str | os.PathLike[str]) -> str | None:
    """The id of the run in `output_dir` (from `run.json`), or None when there is none."""
    path = Path(output_dir) / RUN_FILE
    if not path.is_file():
        return None
    try:
        run_id = json.loads(path.read_text()).get("run_id")
    except (OSError, ValueError, AttributeError) as exc:
        raise OutputDirError(
            f"{path} cannot be read ({exc}); it names the run this directory holds. Delete "
            "the directory's run with --overwrite, or choose another --output_dir"
        ) from exc
    return str(run_id) if run_id else None


def write_run_file(output_dir: str | os.PathLike[str], run_id: str) -> None:
    """Record `run_id` as the run of `output_dir` (atomically)."""
    body = {"run_id": run_id, "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    atomic_write_bytes(Path(output_dir) / RUN_FILE, (dumps_strict(body, indent=2) + "\n").encode())


def run_contents(output_dir: Path) -> list[str]:
    """The files and directories of a tilpass run in `output_dir` (others are not counted)."""
    if not output_dir.is_dir():
        return []
    names = [p.name for p in output_dir.iterdir()]
    found = [f"{n}/" for n in SAVED_DIRS if n in names]
    found += [f"{n}/" for n in sorted(names, key=_step_of) if CHECKPOINT_RE.match(n)]
    return found + [n for n in RUN_FILES if n in names]


def _step_of(name: str) -> int:
    found = CHECKPOINT_RE.match(name)
    return int(found.group(1)) if found else -1


def holds_results(output_dir: Path) -> bool:
    """Whether `output_dir` holds something a run produced that is worth keeping."""
    kept = ("adapter/", "model/", "checkpoint-")
    return any(name.startswith(kept) for name in run_contents(output_dir))


def describe_run(output_dir: Path) -> str:
    """What the run in `output_dir` left there, for the refusal message."""
    try:
        run_id = read_run_id(output_dir)
    except OutputDirError:
        run_id = "unreadable run.json"
    contents = run_contents(output_dir)
    finished = [n for n in contents if n.rstrip("/") in SAVED_DIRS]
    state = f"finished, {' and '.join(finished)} saved" if finished else "not finished"
    who = f"run {run_id}" if run_id else "a run without a run id"
    return f"{who} ({state}): {', '.join(contents)}"


def remove_run(output_dir: Path) -> None:
    """Delete the run in `output_dir`, leaving files that are not a run's alone.

    `run.json` goes first: from then on no checkpoint left in the directory carries the id of
    any run that could resume it, so a crash half-way leaves nothing that can be mixed in.
    """
    (output_dir / RUN_FILE).unlink(missing_ok=True)
    doomed = [output_dir / n.rstrip("/") for n in run_contents(output_dir)]
    doomed += [p for p in output_dir.iterdir() if _DEBRIS_RE.match(p.name)]
    for path in doomed:
        if not path.exists():
            continue
        hidden = path.with_name(f".{path.name}.deleting-{os.getpid()}-{secrets.token_hex(4)}")
        os.replace(path, hidden)
        if hidden.is_dir():
            shutil.rmtree(hidden)
        else:
            hidden.unlink()


def claim_output_dir(
    output_dir: str | os.PathLike[str], *, overwrite: bool = False, resume: str | None = None
) -> str:
    """Make `output_dir` this run's and return the run's id; refuse one holding another run.

    Args:
        output_dir: the run's `output_dir`.
        overwrite: remove a run found there first (the user's `--overwrite`).
        resume: the user's `--resume` (`"auto"` or a checkpoint path): continue the run there,
            or, in a directory without a run, the run that wrote the checkpoint.
    """
    out = Path(output_dir)
    adopted = _checkpoint_owner(resume)  # also checks a checkpoint path before anything else
    if overwrite and resume is not None:
        raise OutputDirError("--overwrite deletes the run that --resume would continue; pass one")
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"output_dir {out} is a file, not a directory")
    if run_contents(out) and (overwrite or (resume is None and not holds_results(out))):
        remove_run(out)  # asked for, or the leftovers of a run that saved nothing
    if not run_contents(out):
        out.mkdir(parents=True, exist_ok=True)
        run_id = adopted or new_run_id()
        write_run_file(out, run_id)
        return run_id
    if resume is None:
        raise OutputDirError(
            f"output_dir {out} holds another run: {describe_run(out)}. Pass --overwrite to "
            "delete it and start afresh, --resume auto to continue it, or choose another "
            "--output_dir"
        )
    run_id = read_run_id(out)
    if adopted is not None and run_id is not None and adopted != run_id:
        raise OutputDirError(
            f"--resume {resume} was written by run {adopted}, but output_dir {out} holds run "
            f"{run_id}: a run resumes only its own checkpoints. Resume into that run's own "
            "output_dir, or into an empty one"
        )
    if run_id is None:
        if list_checkpoints(out):
            raise OutputDirError(
                f"output_dir {out} holds checkpoints without a run id (written by an older "
                "tilpass), so they cannot be told apart from another run's. Pass --overwrite "
                "to start afresh, or choose another --output_dir"
            )
        run_id = adopted or new_run_id()
        write_run_file(out, run_id)
    return run_id


def _checkpoint_owner(resume: str | None) -> str | None:
    """The run id of the checkpoint `resume` names by path (None for `"auto"` or None)."""
    if resume is None or resume == "auto":
        return None
    try:
        owner = state_of(Path(resume)).get("run_id")
    except CheckpointError as exc:
        raise OutputDirError(
            f"--resume {resume}: not a complete checkpoint ({exc}); pass --resume auto to "
            "continue from the latest checkpoint of the run in the output directory"
        ) from exc
    return str(owner) if owner else None
