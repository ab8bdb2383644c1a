"""Resuming a run: which checkpoint, what changed since it was written, and applying that.

`choose_checkpoint` picks the checkpoint to resume from among the run's own (by run id),
falls back past a damaged one to the one before it, and says so; a fresh run refuses an
output directory that holds another run's checkpoints. `changed_settings` and
`apply_settings` make settings changed since the checkpoint (learning rate, `max_steps`,
schedule, AdamW settings) take effect from the resumed step on, exactly as an uninterrupted
run with the new settings would have them at that step; settings that fix the data order
cannot change (the trainer refuses those).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tilpass.run_dir import OutputDirError, new_run_id, read_run_id, write_run_file
from tilpass.train_checkpoints import (
    STATE_FILE,
    CheckpointError,
    LoadedCheckpoint,
    MissingCheckpointError,
    apply_checkpoint,
    read_checkpoint,
    remove_stale,
    run_checkpoints,
    state_of,
    truncate_metrics,
)
from tilpass.train_config import StepPlan, TrainConfig, lr_factor

if TYPE_CHECKING:  # train.py imports this module
    from tilpass.train import Trainer

Log = Callable[[str], None]
# Settings that change nothing a resumed run computes; not reported as changes.
_COSMETIC = frozenset({"progress_bar", "keep_freed_memory"})


def choose_checkpoint(
    resume: str | os.PathLike[str] | None,
    output_dir: Path,
    run_id: str,
    device: torch.device,
    log: Log,
) -> LoadedCheckpoint | None:
    """The checkpoint run `run_id` resumes from, read whole; None to start from step 0.

    Args:
        resume: None (a fresh run), ``"auto"`` (the run's latest readable checkpoint in
            ``output_dir``) or the path of a checkpoint of this run.
    """
    found = run_checkpoints(output_dir, run_id)
    others = ", ".join(p.name for p in found.others)
    if resume is None:
        if found.others:
            raise OutputDirError(
                f"{output_dir} holds checkpoints of another run ({others}); a new run there "
                "would mix with them. Choose another output_dir, or remove that run first "
                "(tilpass train --overwrite)"
            )
        return None
    if str(resume) != "auto":
        return _explicit(Path(resume), output_dir, run_id, device)
    for _path, why in found.unreadable:
        log(f"warning: {why}; that checkpoint is skipped")
    if others:
        log(f"note: {others} in {output_dir} belong to another run and are ignored")
    for path in reversed(found.mine):
        try:
            return read_checkpoint(path, device)
        except CheckpointError as exc:
            log(f"warning: {exc}; falling back to the checkpoint before it")
    log(f"resume: no complete checkpoint of this run in {output_dir}; training from step 0")
    return None


def _explicit(path: Path, output_dir: Path, run_id: str, device: torch.device) -> LoadedCheckpoint:
    if not (path / STATE_FILE).is_file() or not (path / "trainable.safetensors").is_file():
        raise MissingCheckpointError(
            f"{path} is not a complete checkpoint (needs {STATE_FILE} and "
            f"trainable.safetensors); pass --resume auto to pick the latest one of this run "
            f"in {output_dir}"
        )
    loaded = read_checkpoint(path, device)
    owner = loaded.state.get("run_id")
    if owner != run_id:
        raise CheckpointError(
            f"{path} was written by run {owner or '(no run id)'}, but {output_dir} holds run "
            f"{run_id}: a run resumes only its own checkpoints. Resume into that run's own "
            "output_dir, or into an empty one"
        )
    return loaded


def changed_settings(saved: dict[str, Any], config: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """The settings of `config` that differ from those a checkpoint was written with."""
    now = asdict(config)
    return {
        key: (saved[key], value)
        for key, value in now.items()
        if key in saved and key not in _COSMETIC and saved[key] != value
    }


def apply_settings(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    config: TrainConfig,
    plan: StepPlan,
    step: int,
) -> None:
    """Put `config`'s optimizer settings and schedule into a restored optimizer at `step`.

    The learning rate becomes the one the schedule of `config` and `plan` gives at `step` (the
    same float an uninterrupted run computes, so unchanged settings resume bit for bit).
    """
    factor = lr_factor(step, plan.max_steps, plan.warmup, config.lr_scheduler)
    scheduler.base_lrs = [config.learning_rate] * len(optimizer.param_groups)
    for group in optimizer.param_groups:
        matrices = all(p.ndim >= 2 for p in group["params"])
        group["weight_decay"] = config.weight_decay if matrices else 0.0
        group["initial_lr"] = config.learning_rate
        group["lr"] = config.learning_rate * factor
        group["betas"] = (config.adam_beta1, config.adam_beta2)
        group["eps"] = config.adam_epsilon


def describe_resume(
    loaded: LoadedCheckpoint, plan: StepPlan, changes: dict[str, tuple[Any, Any]]
) -> list[str]:
    """What the log says about a resume: from where, and which settings changed."""
    step = int(loaded.state["global_step"])
    lines = [f"resumed from {loaded.path} (step {step} of {plan.max_steps})"]
    if changes:
        shown = ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changes.items())
        lines.append(
            f"settings changed since that checkpoint, applied from step {step + 1} on: {shown}"
        )
    if step >= plan.max_steps:
        lines.append(
            f"the checkpoint is at step {step}; max_steps is {plan.max_steps}: no step left"
        )
    return lines


def own_run_id(trainer: Trainer, resume: str | os.PathLike[str] | None) -> str:
    """The run's id: the trainer's, else the output directory's run (resuming) or a new one."""
    if trainer.run_id is not None:
        return trainer.run_id
    found = read_run_id(trainer.output_dir) if resume is not None else None
    if found is None and resume is not None and str(resume) != "auto":
        with contextlib.suppress(CheckpointError):  # choose_checkpoint says what is wrong
            found = state_of(Path(resume)).get("run_id")  # continue that run here
    return found or new_run_id()


def resume_run(trainer: Trainer, resume: str | os.PathLike[str] | None) -> Path | None:
    """Restore a checkpoint of the trainer's run into its model, optimizer, schedule, RNGs and
    loop state, with the settings changed since it was written applied and reported.

    Returns the checkpoint, or None for a run that starts at step 0.
    """
    out = trainer.output_dir
    remove_stale(out)
    trainer.run_id = own_run_id(trainer, resume)
    loaded = choose_checkpoint(resume, out, trainer.run_id, trainer.device, trainer.say)
    if read_run_id(out) != trainer.run_id:
        write_run_file(out, trainer.run_id)
    if loaded is None:
        trainer.metrics_path.unlink(missing_ok=True)  # a fresh run starts a fresh log
        return None
    saved, ckpt = loaded.state, loaded.path
    if saved["data"] != trainer.data_info():
        raise ValueError(
            f"{ckpt} was written with data settings {saved['data']} but this run has "
            f"{trainer.data_info()}; resuming would not replay the same data order. Use the "
            "same dataset, batch_size, gradient_accumulation_steps and seed, or a new "
            "output_dir."
        )
    placed = trainer.dist.place_checkpoint(loaded, trainer.named)  # FSDP2: this rank's shards
    apply_checkpoint(placed, trainer.named, trainer.optimizer, trainer.scheduler)
    st = trainer.state
    st.step = st.saved_at = saved["global_step"]
    apply_settings(trainer.optimizer, trainer.scheduler, trainer.config, trainer.plan, st.step)
    for line in describe_resume(
        loaded, trainer.plan, changed_settings(saved["config"], trainer.config)
    ):
        trainer.say(line)
    st.best, st.bad_evals = saved["best_eval_loss"], saved["evals_without_improvement"]
    st.evaled_at, st.last_checkpoint = saved["last_eval_step"], ckpt
    st.skipped_steps = saved.get("skipped_steps", 0)
    if trainer.config.selective_lm_head:
        st.selective = saved["selective_lm_head"]
    truncate_metrics(trainer.metrics_path, st.step)
    return ckpt
