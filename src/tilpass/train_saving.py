"""The trainer's evaluate, checkpoint and end phases: what a run keeps and reports.

Functions of a :class:`tilpass.train.Trainer` (as :mod:`tilpass.train_resume` is), so the loop
in `train.py` stays the order of the phases and this file what each of these phases writes.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tilpass.evaluate import evaluate_model
from tilpass.train_checkpoints import save_checkpoint
from tilpass.train_state import DivergenceError, nonfinite_parameters

if TYPE_CHECKING:
    from tilpass.train import Trainer

# Examples shown in an eval event.
EVAL_EXAMPLES = 3


def evaluate_now(trainer: Trainer) -> dict[str, Any]:
    """Eval loss / perplexity and exact match as configured; logged as an eval event."""
    c, st = trainer.config, trainer.state
    metrics = evaluate_model(
        trainer.model,
        trainer.eval_dataset,
        trainer.collate_fn,
        tokenizer=trainer.tokenizer,
        records=trainer.eval_records,
        batch_size=c.eval_batch_size,
        max_new_tokens=c.eval_max_new_tokens,
        generation_samples=c.eval_generation_samples,
        num_examples=EVAL_EXAMPLES,
        prompt_fn=trainer.prompt_fn,
        answer_fn=trainer.answer_fn,
        selective=st.selective,
        autocast=trainer.autocast,
    )
    ev: dict[str, Any] = {}
    if "loss" in metrics:
        ev |= {"eval_loss": metrics["loss"], "eval_perplexity": metrics["perplexity"]}
        ev["eval_tokens"] = metrics["tokens"]
    if "exact_match" in metrics:
        ev |= {k: metrics[k] for k in ("exact_match", "exact_match_n", "examples")}
    if ev:
        trainer.events.write({"event": "eval", "step": st.step, **ev})
    return ev


def save_step(trainer: Trainer) -> Path:
    """A checkpoint of the current step (rotating out the oldest), logged."""
    st, plan = trainer.state, trainer.plan
    trainer_state = {
        "format": 1,
        "global_step": st.step,
        "epoch": st.step // plan.steps_per_epoch,
        "batch_in_epoch": (st.step % plan.steps_per_epoch) * plan.accumulation,
        "data": trainer.data_info(),
        "max_steps": plan.max_steps,
        "best_eval_loss": st.best,
        "evals_without_improvement": st.bad_evals,
        "last_eval_step": st.evaled_at,
        "selective_lm_head": st.selective,
        "skipped_steps": st.skipped_steps,
        "run_id": trainer.run_id,
        "config": asdict(trainer.config),
    }
    bad = nonfinite_parameters(trainer.named)
    if bad:
        raise DivergenceError(
            f"step {st.step}: {len(bad)} trainable tensors hold NaN or infinity (e.g. "
            f"{bad[0]}); training diverged and no checkpoint or adapter is saved from it. "
            f"Lower training.learning_rate (now {trainer.config.learning_rate:g})"
        )
    named, optimizer = trainer.dist.full_state(trainer.named, trainer.optimizer)
    if not trainer.dist.is_main:  # rank 0 writes; every rank holds the same weights
        return trainer.output_dir / f"checkpoint-{st.step}"
    path = save_checkpoint(
        trainer.output_dir,
        st.step,
        named,
        optimizer,
        trainer.scheduler,
        trainer_state,
        trainer.config.save_total_limit,
    )
    trainer.events.write({"event": "checkpoint", "step": st.step, "path": str(path)})
    return path


def finish_run(trainer: Trainer) -> float:
    """Final evaluation and checkpoint unless this step has them; the end event."""
    st = trainer.state
    if st.saved_at != st.step:  # first, so a failing final evaluation loses no training
        st.last_checkpoint, st.saved_at = save_step(trainer), st.step
    if st.evaled_at != st.step:
        st.last_eval, st.evaled_at = evaluate_now(trainer), st.step
        loss = st.last_eval.get("eval_loss")
        if loss is not None and math.isfinite(loss):
            st.best = loss if st.best is None else min(st.best, loss)
    runtime = time.perf_counter() - trainer.started
    trainer.events.write(
        {
            "event": "end",
            "step": st.step,
            "runtime_s": runtime,
            "stopped_early": st.stopped_early,
            "skipped_steps": st.skipped_steps,
        }
    )
    return runtime
