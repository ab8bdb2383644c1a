"""The training loop: plain PyTorch, method-agnostic, resumable to the same final weights.

It trains whatever parameters have ``requires_grad=True`` (LoRA or any other adapter, or
every parameter for full fine-tuning) with AdamW, warm-up plus a cosine/linear/constant
schedule, gradient accumulation normalised by loss tokens, and gradient clipping.

:class:`Trainer` runs it; each optimizer step goes through the same phases, in order::

    batch -> forward -> loss (+ hooks' loss terms) -> backward -> hooks' after_backward
      -> clip -> optimizer step -> schedule -> log -> evaluate -> checkpoint -> on_step_end

Methods and users plug in through :class:`TrainingHook` objects: from the ``hooks`` argument
and from the model's own ``training_hooks()`` (an adapter wrapper returns its methods' hooks).
:func:`train` is the one-call form.

Data order is a pure function of ``(seed, epoch)``, so a resumed run skips exactly the
micro-batches already consumed and, with the optimizer, scheduler and RNG states restored
from ``checkpoint-N/`` (see :mod:`tilpass.train_checkpoints`), reaches the same final parameters
as an uninterrupted run. Outputs: ``metrics.jsonl`` (one JSON line per event), ``loss.png``
and the last ``save_total_limit`` checkpoints.

With several ranks (``torchrun``; :mod:`tilpass.distributed`) each rank trains its slice of
every global micro-batch under DDP or FSDP2, the loss normalised over all ranks' loss tokens,
and only rank 0 prints, logs and writes checkpoints.

The settings and what follows from them (data order, step plan, schedule) are in
:mod:`tilpass.train_config`, the loop's running state in :mod:`tilpass.train_state`, what the
evaluate, checkpoint and end phases write in :mod:`tilpass.train_saving`; this module re-exports
the public names of the first two.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from tilpass.data.packing import Batching, BatchPlan, check_packing, prepare_packing, token_counts
from tilpass.distributed import DataParallel, SilentLog
from tilpass.losses import (
    Batch,
    count_loss_tokens,
    model_device,
    selective_loss_matches,
    to_device,
)
from tilpass.packed_attention import PackedAttention
from tilpass.runtime import autocast_for, enable_gradient_checkpointing, peak_memory_mb
from tilpass.train_checkpoints import (
    MetricsLog,
    plot_losses,
)
from tilpass.train_config import (
    PRECISIONS,
    SCHEDULERS,
    StepPlan,
    TrainConfig,
    consumed_examples,
    epoch_batches,
    lr_factor,
    seed_everything,
)
from tilpass.train_hooks import Callback, HookSet, TrainingHook, TrainState
from tilpass.train_resume import resume_run
from tilpass.train_saving import evaluate_now, finish_run, save_step
from tilpass.train_state import (
    DivergenceError,
    GradientAudit,
    GradientFlowError,
    LogWindow,
    LoopState,
    StepOutput,
    check_gradient_flow,
)

__all__ = [
    "METRICS_FILE",
    "PLOT_FILE",
    "PRECISIONS",
    "SCHEDULERS",
    "Callback",
    "DivergenceError",
    "GradientFlowError",
    "StepPlan",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "Trainer",
    "TrainingHook",
    "check_gradient_flow",
    "consumed_examples",
    "enable_gradient_checkpointing",
    "epoch_batches",
    "lr_factor",
    "seed_everything",
    "train",
]

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


@dataclass
class TrainResult:
    """Summary of a finished :func:`train` call."""

    global_step: int
    train_loss: float | None
    eval_metrics: dict[str, Any]
    best_eval_loss: float | None
    stopped_early: bool
    checkpoint_dir: Path | None
    metrics_path: Path
    plot_path: Path | None
    runtime_s: float


# ----------------------------------------------------------------------------- trainer


class Trainer:
    """Trains every parameter with ``requires_grad=True``; evaluates, logs and checkpoints.

    Build it, then call :meth:`fit` once. Arguments are those of :func:`train`, with
    ``hooks`` for ``callbacks``; setup (optimizer, schedule, gradient checkpointing, hooks)
    happens here, the run (resume, log, steps, final eval and checkpoint) in :meth:`fit`.
    """

    events: MetricsLog  # the run's metrics.jsonl, open during fit()
    _pbar: Any  # tqdm progress bar, during fit()

    def __init__(
        self,
        model: nn.Module,
        train_dataset: Dataset,
        eval_dataset: Dataset | None,
        collate_fn: Callable[[list[Any]], Batch],
        config: TrainConfig,
        output_dir: str | os.PathLike[str],
        *,
        tokenizer: Any = None,
        eval_records: Sequence[Any] | None = None,
        hooks: Iterable[TrainingHook] = (),
        prompt_fn: Callable[[Any, Any], list[int]] | None = None,
        answer_fn: Callable[[Any], str] | None = None,
        run_id: str | None = None,
        log: Callable[[str], None] = print,
        distributed: DataParallel | None = None,
        batching: Batching | None = None,
    ) -> None:
        config.validate()
        self.dist = distributed or DataParallel()  # a world of one unless launched by torchrun
        self.run_id, self.say = run_id, log if self.dist.is_main else _quiet
        self.started = time.perf_counter()
        self.model, self.config = model, config
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.collate_fn = collate_fn
        self.tokenizer, self.eval_records = tokenizer, eval_records
        self.prompt_fn, self.answer_fn = prompt_fn, answer_fn
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.output_dir / METRICS_FILE
        n = len(train_dataset)  # type: ignore[arg-type]
        if n == 0:
            raise ValueError("train_dataset is empty: check the data file and its filters")
        self.loss_fn = self.dist.wrap(model)  # DDP / FSDP2 over the loss; plain in one process
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no trainable parameters (requires_grad=True)")
        # Matrices first: the order of the optimizer's parameter groups.
        self.named = [x for x in named if x[1].ndim >= 2] + [x for x in named if x[1].ndim < 2]
        self.params = [p for _, p in self.named]
        self.hooks = HookSet.collect(model, hooks)
        self.device = model_device(model)
        self.autocast = autocast_for(config, self.device)
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        self.plan = StepPlan.of(n, self.dist.global_config(config))  # global micro-batches
        self.attention = PackedAttention(model, enabled=False)
        if batching is not None and batching.packing:  # refuse attention across examples
            probe = [train_dataset[i] for i in range(min(n, 3))]
            if self.dist.size > 1:  # each rank packs its share into masked rows
                check_packing(model, probe)
            else:
                self.attention = prepare_packing(model, probe)
        self.batches = BatchPlan(
            train_dataset,
            collate_fn,
            self.plan.batch_size,
            config.seed,
            batching,
            flat=self.attention.enabled,  # attention per example: one padding-free row each
        )
        self.optimizer = self._build_optimizer()
        self.scheduler = self._build_scheduler()
        self.state = LoopState(selective=None if config.selective_lm_head else False)
        self._audit = GradientAudit(self.named)
        self._window = LogWindow(torch.zeros((), dtype=torch.float64, device=self.device))
        self._fitted = False

    # -------------------------------------------------------------------------- setup

    def _build_optimizer(self) -> torch.optim.Optimizer:
        """AdamW; weight decay on matrices only (not biases or norms)."""
        c = self.config
        groups = [
            {"params": [p for p in self.params if p.ndim >= 2], "weight_decay": c.weight_decay},
            {"params": [p for p in self.params if p.ndim < 2], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(
            [g for g in groups if g["params"]],
            lr=c.learning_rate,
            betas=(c.adam_beta1, c.adam_beta2),
            eps=c.adam_epsilon,
        )

    def _build_scheduler(self) -> torch.optim.lr_scheduler.LambdaLR:
        """Linear warm-up, then the configured decay, over the plan's steps."""
        plan, kind = self.plan, self.config.lr_scheduler
        return torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, plan.max_steps, plan.warmup, kind)
        )

    def data_info(self) -> dict[str, Any]:
        """What fixes the data order; a checkpoint only resumes a run with the same."""
        return {
            "seed": self.config.seed,
            "num_examples": self.plan.num_examples,
            "batch_size": self.plan.batch_size,
            "gradient_accumulation_steps": self.plan.accumulation,
            **self.batches.data_info(),
        }

    def _resume(self, resume: str | os.PathLike[str] | None) -> Path | None:
        """Restore a checkpoint of this run (see :func:`tilpass.train_resume.resume_run`);
        with several ranks, rank 0 chooses it and the others follow, one after the other."""
        if self.dist.size == 1:
            return resume_run(self, resume)
        chosen = resume_run(self, resume) if self.dist.is_main else None
        chosen, self.run_id = self.dist.share((chosen, self.run_id))
        if not self.dist.is_main:
            resume_run(self, chosen)
        self.dist.barrier()
        return chosen

    def _open_log(self, resumed_from: Path | None) -> MetricsLog:
        """Open ``metrics.jsonl`` (appending after a resume) and write the start event."""
        if not self.dist.is_main:
            return SilentLog()  # type: ignore[return-value]  # rank 0 writes the log
        log = MetricsLog(self.metrics_path, self.hooks.on_log)
        log.write(
            {
                "event": "start",
                "step": self.state.step,
                "max_steps": self.plan.max_steps,
                "num_examples": self.plan.num_examples,
                "steps_per_epoch": self.plan.steps_per_epoch,
                "trainable_params": sum(p.numel() for p in self.params),
                "total_params": sum(p.numel() for p in self.model.parameters()),
                "precision": "bf16" if self.autocast is not None else "fp32",
                "device": str(self.device),
                "run_id": self.run_id,
                "resumed_from": str(resumed_from) if resumed_from else None,
            }
        )
        return log

    # ---------------------------------------------------------------------------- run

    def fit(self, resume: str | os.PathLike[str] | None = None) -> TrainResult:
        """Run to ``max_steps`` (or an early stop), then evaluate and checkpoint the end.

        Args:
            resume: ``"auto"`` (latest complete checkpoint in output_dir, if any) or a path.
        """
        from tqdm.auto import tqdm

        if self._fitted:
            raise RuntimeError("Trainer.fit() runs once; build a new Trainer for another run")
        self._fitted = True
        seed_everything(self.config.seed)
        ckpt = self._resume(resume)
        self.events = self._open_log(ckpt)
        self._pbar = tqdm(
            total=self.plan.max_steps,
            initial=self.state.step,
            disable=not (self.config.progress_bar and self.dist.is_main),
            desc="train",
        )
        try:
            self.model.train()
            self._window.reset(time.perf_counter())
            with self.attention.active():  # packed runs: attention per example
                self._run_steps()
            runtime = finish_run(self)
        finally:
            self._pbar.close()
            self.events.close()
        st = self.state
        return TrainResult(
            global_step=st.step,
            train_loss=st.train_loss,
            eval_metrics=st.last_eval,
            best_eval_loss=st.best,
            stopped_early=st.stopped_early,
            checkpoint_dir=st.last_checkpoint,
            metrics_path=self.metrics_path,
            plot_path=plot_losses(self.metrics_path, self.output_dir / PLOT_FILE)
            if self.dist.is_main
            else None,
            runtime_s=runtime,
        )

    def _run_steps(self) -> None:
        """Optimizer steps, epoch by epoch, from the current step to the end or a stop."""
        st, plan, accum = self.state, self.plan, self.plan.accumulation
        while st.step < plan.max_steps and not st.stop:
            epoch = st.step // plan.steps_per_epoch
            batches = self.batches.epoch_batches(epoch)
            for first in range((st.step % plan.steps_per_epoch) * accum, len(batches), accum):
                self._train_step(batches[first : first + accum], epoch)
                if st.step >= plan.max_steps or st.stop:
                    break

    def _train_step(self, index_groups: list[list[int]], epoch: int) -> None:
        """One optimizer step over the micro-batches of ``index_groups``, phase by phase."""
        micro = self._batch(index_groups)
        out = self._forward_backward(micro)
        unused = self._audit.find_unused(out.loss_tokens)  # before hooks may edit gradients
        for after_backward in self.hooks.after_backward:
            after_backward(self.state.step)
        out.grad_norm = self._clip()
        if self._finite(out):
            if unused is not None:  # a diverged step's zero gradients prove nothing
                raise unused
            out.lr = self._optimizer_step()
            self._window.add(out)
        else:
            out.lr = self._skip_step(out)
        self.state.step += 1
        self._pbar.update(1)
        self._maybe_log(out)
        self._maybe_evaluate()
        self._maybe_checkpoint()
        self._end_step(out, epoch)

    # --------------------------------------------------------------------- step phases

    def _batch(self, index_groups: list[list[int]]) -> list[Batch]:
        """This rank's part of the step's micro-batches, packed or padded (all of them in one
        process)."""
        if self.batches.batching.packing:
            return self.dist.packed_step(index_groups, self.batches)
        return [self.dist.micro_batch(idx, self.batches.padded) for idx in index_groups]

    def _forward_backward(self, micro: list[Batch]) -> StepOutput:
        """Forward, loss (+ hooks' loss terms) and backward of every micro-batch of a step."""
        n_tok = sum(count_loss_tokens(b) for b in micro)
        seen, positions = (sum(c) for c in zip(*map(token_counts, micro), strict=True))
        # the whole step's counts, over all ranks
        n_tok, seen, positions = self.dist.sum_counts(n_tok, seen, positions)
        if self.state.selective is None:
            first = to_device(micro[0], self.device)
            self.state.selective = selective_loss_matches(self.model, first, self.autocast)
        out = StepOutput(torch.zeros((), dtype=torch.float64, device=self.device), n_tok, seen, {})
        out.positions = positions
        for i, b in enumerate(micro):
            with self.dist.sync(last=i == len(micro) - 1), self.autocast or nullcontext():
                loss, _ = self.loss_fn(to_device(b, self.device), self.state.selective)
            # Normalise by the loss tokens of the whole step: accumulation 4 x batch 2 is then
            # the same update as batch 8, and 2 ranks x batch 4 as one process with batch 8.
            objective = loss * self.dist.loss_scale / max(n_tok, 1)
            if self.hooks.loss_terms:
                objective = objective + self.hooks.loss_term_total(
                    self.state.step, out.terms, len(micro)
                )
            with self.dist.sync(last=i == len(micro) - 1):
                objective.backward()
            out.loss += loss.detach().double()
        out.loss = self.dist.sum(out.loss)
        return out

    def _finite(self, out: StepOutput) -> bool:
        """Whether the step's loss, loss terms and gradient norm are finite (one device sync)."""
        total = out.loss + sum(out.terms.values(), torch.zeros_like(out.loss))
        if out.grad_norm is not None:
            total = total + out.grad_norm.to(total)
        return bool(torch.isfinite(total))

    def _skip_step(self, out: StepOutput) -> float:
        """A step with a non-finite loss or gradient: stop the run, or drop its update."""
        step, c = self.state.step + 1, self.config
        loss = float(out.loss) / max(out.loss_tokens, 1)
        grad = float(out.grad_norm) if out.grad_norm is not None else float("nan")
        if c.on_nonfinite == "stop":
            self.events.write({"event": "nonfinite", "step": step, "loss": loss, "grad_norm": grad})
            raise DivergenceError(
                f"step {step}: the training loss is {loss:g} and the gradient norm {grad:g}; "
                "training diverged, and no adapter is saved from it. Lower "
                f"training.learning_rate (now {c.learning_rate:g}), keep training.max_grad_norm "
                "> 0, or set training.on_nonfinite: skip to drop such steps"
            )
        self.optimizer.zero_grad(set_to_none=True)
        lr = float(self.optimizer.param_groups[0]["lr"])
        self.scheduler.step()  # the schedule stays on the step count, as if the step had run
        self.state.skipped_steps += 1
        self.events.write({"event": "skipped_step", "step": step, "loss": loss, "grad_norm": grad})
        return lr

    def _clip(self) -> torch.Tensor:
        """Clip the global gradient norm; returns the norm before clipping."""
        limit = self.config.max_grad_norm
        return torch.nn.utils.clip_grad_norm_(self.params, limit if limit > 0 else float("inf"))

    def _optimizer_step(self) -> float:
        """Optimizer step, schedule step, gradients cleared; returns the lr the step used."""
        lr = float(self.optimizer.param_groups[0]["lr"])
        try:
            self.optimizer.step()
        except RuntimeError as exc:  # AdamW's step size lr / (1 - beta1^t) past float's range
            if "overflow" not in str(exc):
                raise
            raise DivergenceError(
                f"step {self.state.step + 1}: the optimizer's update overflows ({exc}); "
                f"training.learning_rate {lr:g} is far too large"
            ) from exc
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return lr

    def _maybe_log(self, out: StepOutput) -> None:
        """Every ``logging_steps`` (and at the last step): a train event over the window."""
        every, step = self.config.logging_steps, self.state.step
        if not every or (step % every != 0 and step != self.plan.max_steps):
            return
        now, window = time.perf_counter(), self._window
        names = [name for name, _ in self.hooks.loss_terms]
        loss, terms = window.means(names)
        self.state.train_loss = loss
        tps, mem = window.seen / max(now - window.started, 1e-9), peak_memory_mb(self.device)
        grad_norm = None if out.grad_norm is None else float(out.grad_norm)
        self.events.write(
            {
                "event": "train",
                "step": step,
                "epoch": step / self.plan.steps_per_epoch,
                "loss": loss,
                **({"loss_terms": terms} if names else {}),
                "lr": out.lr,
                "grad_norm": grad_norm,
                "tokens_per_s": tps,
                "padding_fraction": window.padding_fraction(),
                "loss_tokens": window.tokens,
                "peak_mem_mb": mem,
                "elapsed_s": now - self.started,
            }
        )
        self._pbar.set_postfix(
            loss=f"{loss:.4f}",
            lr=f"{out.lr:.2e}",
            tok_s=f"{tps:.0f}",
            pad=f"{window.padding_fraction():.0%}",
            mem=f"{mem:.0f}MB",
        )
        window.reset(now)

    def _maybe_evaluate(self) -> None:
        """Every ``eval_steps``: evaluate, and stop early after ``patience`` evals without gain."""
        c, st = self.config, self.state
        if not c.eval_steps or st.step % c.eval_steps != 0:
            return
        st.last_eval, st.evaled_at = evaluate_now(self), st.step
        loss = st.last_eval.get("eval_loss")
        if loss is None or not math.isfinite(loss):
            return
        if st.best is None or loss < st.best - c.early_stopping_threshold:
            st.best, st.bad_evals = loss, 0
        else:
            st.bad_evals += 1
        if c.early_stopping_patience and st.bad_evals >= c.early_stopping_patience:
            st.stop = st.stopped_early = True
            self.events.write({"event": "early_stop", "step": st.step, "best_eval_loss": st.best})

    def _maybe_checkpoint(self) -> None:
        """Every ``save_steps``: a checkpoint."""
        every, st = self.config.save_steps, self.state
        if every and st.step % every == 0:
            st.last_checkpoint, st.saved_at = save_step(self), st.step

    def _end_step(self, out: StepOutput, epoch: int) -> None:
        """``on_step_end`` hooks; any of them may ask to stop."""
        if not self.hooks.on_step_end:
            return
        loss = float(out.loss) / max(out.loss_tokens, 1)
        loss += sum(float(v) for v in out.terms.values())
        state = TrainState(self.state.step, self.plan.max_steps, epoch, loss, out.lr)
        for on_step_end in self.hooks.on_step_end:
            on_step_end(state)
        self.state.stop = self.state.stop or state.should_stop


def _quiet(line: str) -> None:
    """The log of ranks other than 0: they say nothing."""


def train(
    model: nn.Module,
    train_dataset: Dataset,
    eval_dataset: Dataset | None,
    collate_fn: Callable[[list[Any]], dict[str, torch.Tensor]],
    config: TrainConfig,
    output_dir: str | os.PathLike[str],
    tokenizer: Any = None,
    eval_records: Sequence[Any] | None = None,
    resume: str | os.PathLike[str] | None = None,
    callbacks: Iterable[TrainingHook] = (),
    *,
    prompt_fn: Callable[[Any, Any], list[int]] | None = None,
    answer_fn: Callable[[Any], str] | None = None,
    run_id: str | None = None,
    log: Callable[[str], None] = print,
    distributed: DataParallel | None = None,
    batching: Batching | None = None,
) -> TrainResult:
    """Train every parameter with ``requires_grad=True``; evaluate, log and checkpoint.

    Builds a :class:`Trainer` and runs :meth:`Trainer.fit`.

    Args:
        model: A causal LM (adapter wrapper or plain model), already on its device. If it
            has a ``training_hooks()`` method, the hooks it returns are used too.
        train_dataset: Items ``{"input_ids": [...], "labels": [...]}`` (-100 = no loss).
        eval_dataset: Same format, for eval loss/perplexity; None skips it.
        collate_fn: Pads a list of items into tensors (``input_ids``, ``attention_mask``,
            ``labels``), right-padded.
        config: Hyper-parameters.
        output_dir: Receives ``metrics.jsonl``, ``loss.png`` and ``checkpoint-N/``.
        tokenizer: With ``eval_records``, enables greedy exact-match evaluation.
        eval_records: Raw records for generation eval.
        resume: ``"auto"`` (latest complete checkpoint in output_dir, if any) or a path.
        callbacks: :class:`TrainingHook` objects (any of ``loss_term``, ``after_backward``,
            ``on_step_end``, ``on_log``).
        prompt_fn: ``(record, tokenizer) -> ids``; defaults to ``tilpass.data.prompt_ids``.
        answer_fn: ``record -> str``; defaults to ``tilpass.data.reference_answer``.
        run_id: The run's id (`tilpass.run_dir`); None takes the output directory's run when
            resuming, else a new id. Checkpoints carry it; only the run's own are resumed.
        log: Receives the lines that say what a resume did (default: ``print``).
        distributed: The ranks of a ``torchrun`` launch (`tilpass.distributed`); None: one
            process. Only rank 0 logs and writes; ``batch_size`` is per rank.
        batching: Packing and length grouping (default: padded micro-batches, random order).

    Returns:
        A :class:`TrainResult` (final step, losses, last eval metrics, last checkpoint).

    Raises:
        GradientFlowError: Some trainable parameter gets no gradient (checked on early steps).
        DivergenceError: A non-finite loss or gradient (``on_nonfinite: stop``), or weights.
        ValueError: Invalid config, empty data, or a checkpoint that does not fit this run.
    """
    trainer = Trainer(
        model,
        train_dataset,
        eval_dataset,
        collate_fn,
        config,
        output_dir,
        tokenizer=tokenizer,
        eval_records=eval_records,
        hooks=callbacks,
        prompt_fn=prompt_fn,
        answer_fn=answer_fn,
        run_id=run_id,
        log=log,
        distributed=distributed,
        batching=batching,
    )
    return trainer.fit(resume)
