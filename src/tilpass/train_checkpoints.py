"""Files a training run writes: checkpoints (save, list, load, rotate) and the metrics log.

The metrics log ``metrics.jsonl`` holds one JSON object per event (:class:`MetricsLog`); a
resumed run first drops the events logged after its checkpoint (:func:`truncate_metrics`).

A checkpoint ``checkpoint-N/`` holds::

    trainable.safetensors   trainable parameters keyed by name (loaded back strictly)
    optimizer.safetensors   AdamW state keyed "<parameter name>::<state key>"
    rng.safetensors         torch (and CUDA) generator states
    trainer_state.json      step, data position, scheduler, python/numpy RNG, early stopping

It is written to a temporary directory and renamed into place, so a directory named
``checkpoint-N`` that contains ``trainer_state.json`` is always complete. No pickle anywhere.
``trainer_state.json`` carries the id of the run that wrote it: rotation deletes, and resume
reads, only the checkpoints of the run at hand (:func:`run_checkpoints`). A checkpoint
damaged after the fact (a truncated file) is read whole before anything is restored
(:func:`read_checkpoint`), so a caller can name the file and fall back to an older one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from tilpass.adapter_files import default_file_mode
from tilpass.errors import TilpassError
from tilpass.json_files import clean_json, dumps_strict

TENSOR_FILES = ("trainable.safetensors", "optimizer.safetensors", "rng.safetensors")


class CheckpointError(TilpassError, ValueError):
    """A checkpoint that cannot be read or does not belong to this run; the message names it."""


class MissingCheckpointError(CheckpointError, FileNotFoundError):
    """A path given as a checkpoint that holds no complete checkpoint."""


CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
# Debris of a save or rotation that crashed half-way.
_STALE_RE = re.compile(r"^\.checkpoint-\d+\.(tmp|old|deleting)-\d+$")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    py = random.getstate()
    meta: dict[str, Any] = {"python": [py[0], list(py[1]), py[2]]}
    try:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        meta["numpy"] = [kind, keys.tolist(), pos, has_gauss, gauss]
    except ImportError:
        pass
    return tensors, meta


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    v, state, gauss = meta["python"]
    random.setstate((v, tuple(state), gauss))
    if "numpy" in meta:
        import numpy as np

        kind, keys, pos, has_gauss, g = meta["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, g))


def _optimizer_tensors(
    optimizer: torch.optim.Optimizer, names: Sequence[str]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"{names[idx]}::{key}"] = val.detach().contiguous()
            else:
                scalars.setdefault(names[idx], {})[key] = val
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _load_optimizer(
    optimizer: torch.optim.Optimizer,
    names: Sequence[str],
    tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
) -> None:
    index = {n: i for i, n in enumerate(names)}
    state: dict[int, dict[str, Any]] = {}
    for key, val in tensors.items():
        name, _, sub = key.rpartition("::")
        state.setdefault(index[name], {})[sub] = val
    for name, extra in meta["scalars"].items():
        state.setdefault(index[name], {}).update(extra)
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def list_checkpoints(output_dir: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first (temp/incomplete ones ignored)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and (p / STATE_FILE).is_file() and (p / "trainable.safetensors").is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def save_checkpoint(
    output_dir: Path,
    step: int,
    named: Sequence[tuple[str, nn.Parameter]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: dict[str, Any],
    save_total_limit: int,
) -> Path:
    """Write ``checkpoint-{step}/`` atomically, then keep only the last ``save_total_limit``.

    ``state`` is the trainer's own state (step, data position, early stopping, ``run_id``);
    the optimizer, scheduler and RNG states are added to it here. Only checkpoints of the
    same ``run_id`` are rotated out. Returns the checkpoint's path.
    """
    final = output_dir / f"checkpoint-{step}"
    _refuse_foreign(final, state.get("run_id"))
    tmp = output_dir / f".checkpoint-{step}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    names = [n for n, _ in named]
    save_file({n: p.detach().contiguous() for n, p in named}, str(tmp / "trainable.safetensors"))
    opt_tensors, opt_meta = _optimizer_tensors(optimizer, names)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    rng_tensors, rng_meta = _rng_state()
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    full = {**state, "optimizer": opt_meta, "scheduler": scheduler.state_dict(), "rng": rng_meta}
    (tmp / STATE_FILE).write_text(dumps_strict(full, indent=2))  # last: marks completeness
    for f in tmp.iterdir():
        os.chmod(f, default_file_mode())  # safetensors writes mode 0600 whatever the umask
        _fsync(f)
    if final.exists():  # re-saving the same step (e.g. a rerun): swap the old one out first
        old = output_dir / f".checkpoint-{step}.old-{os.getpid()}"
        os.replace(final, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, final)
    _fsync(output_dir)
    if save_total_limit > 0:
        for stale in run_checkpoints(output_dir, state.get("run_id")).mine[:-save_total_limit]:
            doomed = stale.with_name(f".{stale.name}.deleting-{os.getpid()}")
            os.replace(stale, doomed)  # rename first so a crash never leaves a half checkpoint
            shutil.rmtree(doomed, ignore_errors=True)
    return final


def _refuse_foreign(path: Path, run_id: str | None) -> None:
    """Raise `CheckpointError` if ``path`` is a checkpoint of a run other than ``run_id``."""
    if not (path / STATE_FILE).is_file():
        return
    try:
        owner = state_of(path).get("run_id")
    except CheckpointError:
        return  # unreadable: not anyone's usable checkpoint
    if owner != run_id:
        raise CheckpointError(
            f"{path} belongs to run {owner or '(no run id)'}; run {run_id} does not overwrite "
            "another run's checkpoint. Move it away, or train in another output_dir"
        )


@dataclass
class RunCheckpoints:
    """The complete checkpoints in an output directory, by owner (each list oldest first)."""

    mine: list[Path]  # written by the run asked about
    others: list[Path]  # written by another run (or by a tilpass without run ids)
    unreadable: list[tuple[Path, str]]  # trainer_state.json cannot be read: (path, why)


def state_of(path: Path) -> dict[str, Any]:
    """A checkpoint's ``trainer_state.json``; `CheckpointError` naming the file if unreadable."""
    file = path / STATE_FILE
    try:
        state = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file} cannot be read ({exc})") from exc
    if not isinstance(state, dict) or "global_step" not in state:
        raise CheckpointError(f"{file} is not a tilpass trainer state")
    return state


def run_checkpoints(output_dir: str | os.PathLike[str], run_id: str | None) -> RunCheckpoints:
    """The complete checkpoints of ``output_dir``, split into run ``run_id``'s and others'."""
    found = RunCheckpoints([], [], [])
    for path in list_checkpoints(output_dir):
        try:
            owner = state_of(path).get("run_id")
        except CheckpointError as exc:
            found.unreadable.append((path, str(exc)))
            continue
        (found.mine if owner == run_id else found.others).append(path)
    return found


@dataclass
class LoadedCheckpoint:
    """Every file of a checkpoint, read and checked, not yet applied to anything."""

    path: Path
    state: dict[str, Any]
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]
    rng: dict[str, torch.Tensor]


def read_checkpoint(path: Path, device: torch.device | str = "cpu") -> LoadedCheckpoint:
    """Read all of ``checkpoint-N/``; `CheckpointError` names the first damaged file."""
    state = state_of(path)
    tensors = []
    for name in TENSOR_FILES:
        file = path / name
        try:
            where = str(device) if name == "optimizer.safetensors" else "cpu"
            tensors.append(load_file(str(file), device=where))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(
                f"{file} cannot be read ({exc}); it is truncated or damaged"
            ) from exc
    return LoadedCheckpoint(path, state, *tensors)


def load_trainable(path: Path, named: Sequence[tuple[str, nn.Parameter]]) -> None:
    """Copy a checkpoint's trainable tensors into ``named``; names and shapes must match."""
    copy_trainable(path, load_file(str(path / "trainable.safetensors")), named)


def copy_trainable(
    path: Path, saved: dict[str, torch.Tensor], named: Sequence[tuple[str, nn.Parameter]]
) -> None:
    """Copy tensors read from checkpoint ``path`` into ``named``; names and shapes must match."""
    params = dict(named)
    missing, unexpected = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not match the model's trainable parameters: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}. Build the model (and adapter "
            "config) exactly as for the run that wrote it."
        )
    with torch.no_grad():
        for name, p in named:
            if saved[name].shape != p.shape:
                raise ValueError(
                    f"{name}: checkpoint shape {tuple(saved[name].shape)} != model {tuple(p.shape)}"
                )
            p.copy_(saved[name])


def truncate_metrics(path: Path, step: int) -> None:
    """Drop events logged after ``step`` (by a run that crashed after its last checkpoint)."""
    if not path.is_file():
        return
    kept = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(ln + "\n" for ln in kept))
    os.replace(tmp, path)


def plot_losses(metrics_path: Path, out_path: Path) -> Path | None:
    """Plot train and eval loss from ``metrics.jsonl`` to a PNG (Agg canvas, atomic write)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    events = [json.loads(ln) for ln in metrics_path.read_text().splitlines() if ln.strip()]
    train = [(e["step"], e["loss"]) for e in events if e["event"] == "train"]
    train = [(s, v) for s, v in train if v is not None]  # null: every step skipped (NaN)
    evals = [(e["step"], e.get("eval_loss")) for e in events if e["event"] == "eval"]
    evals = [(s, v) for s, v in evals if v is not None]
    if not train and not evals:
        return None
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for pts, label, style in ((train, "train", "-"), (evals, "eval", "o-")):
        if pts:
            ax.plot(*zip(*pts, strict=True), style, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    fig.savefig(tmp, format="png")
    os.replace(tmp, out_path)
    return out_path


def remove_stale(output_dir: Path) -> None:
    """Delete temp directories left by a save or rotation that crashed half-way."""
    for p in output_dir.iterdir():
        if _STALE_RE.match(p.name):
            shutil.rmtree(p, ignore_errors=True)


def apply_checkpoint(
    loaded: LoadedCheckpoint,
    named: Sequence[tuple[str, nn.Parameter]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> None:
    """Restore parameters, optimizer, scheduler and RNG states from a read checkpoint."""
    copy_trainable(loaded.path, loaded.trainable, named)
    state = loaded.state
    _load_optimizer(optimizer, [n for n, _ in named], loaded.optimizer, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(loaded.rng, state["rng"])


def load_checkpoint(
    path: Path,
    named: Sequence[tuple[str, nn.Parameter]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
) -> dict[str, Any]:
    """Restore parameters, optimizer, scheduler and RNG states; return the trainer state."""
    loaded = read_checkpoint(path, device)
    apply_checkpoint(loaded, named, optimizer, scheduler)
    return loaded.state


class MetricsLog:
    """``metrics.jsonl``, one strict-JSON line per event, each also handed to listeners.

    Every line is flushed as it is written, so a killed run loses at most the event being
    written (a resumed run truncates the log to its checkpoint anyway).
    """

    def __init__(self, path: Path, listeners: Sequence[Callable[[dict[str, Any]], None]]) -> None:
        self.path = path
        self.listeners = list(listeners)
        self._file = path.open("a")

    def write(self, event: dict[str, Any]) -> None:
        """Append ``event`` (NaN/inf become null) and pass it to every listener."""
        event = clean_json(event)
        self._file.write(dumps_strict(event) + "\n")
        self._file.flush()
        for listener in self.listeners:
            listener(event)

    def close(self) -> None:
        """Close the file; the log stays readable (and appendable by a resumed run)."""
        self._file.close()
