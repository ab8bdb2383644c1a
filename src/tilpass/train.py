"""The training loop: plain PyTorch, method-agnostic, resumable to the same final weights.

It trains whatever parameters have ``requires_grad=True`` (LoRA or any other adapter, or
every parameter for full fine-tuning) with AdamW, warm-up plus a cosine/linear/constant
schedule, gradient accumulation normalised by loss tokens, and gradient clipping.

Data order is a pure function of ``(seed, epoch)``, so a resumed run skips exactly the
micro-batches already consumed and, with the optimizer, scheduler and RNG states restored
from ``checkpoint-N/`` (see :mod:`tilpass.train_checkpoints`), reaches the same final parameters as
an uninterrupted run. Outputs: ``metrics.jsonl`` (one JSON line per event), ``loss.png``
and the last ``save_total_limit`` checkpoints.
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import Dataset

from tilpass.errors import TilpassError
from tilpass.evaluate import (
    causal_lm_loss,
    count_loss_tokens,
    evaluate_generation,
    evaluate_loss,
    model_device,
    selective_loss_matches,
    to_device,
    trim_padding,
    unwrap_base,
)
from tilpass.runtime import keep_freed_memory
from tilpass.train_checkpoints import (
    clean_json,
    load_checkpoint,
    plot_losses,
    remove_stale,
    resolve_resume,
    save_checkpoint,
    truncate_metrics,
)

SCHEDULERS = ("cosine", "linear", "constant")
PRECISIONS = ("auto", "fp32", "bf16")
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
# A zero gradient is legitimate on the first step (LoRA's A while B == 0), so a parameter
# whose gradient is exactly zero is re-checked until this step before it counts as unused.
_GRAD_CHECK_STEPS = 3


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Hyper-parameters of :func:`train`; each field's ``help`` is shown by ``tilpass train``."""

    learning_rate: float = _opt(2e-4, "Peak AdamW learning rate.")
    weight_decay: float = _opt(0.0, "AdamW weight decay, applied to matrices (not biases/norms).")
    adam_beta1: float = _opt(0.9, "AdamW beta1.")
    adam_beta2: float = _opt(0.999, "AdamW beta2.")
    adam_epsilon: float = _opt(1e-8, "AdamW epsilon.")
    num_epochs: float = _opt(1.0, "Passes over the training set (used when max_steps is 0).")
    max_steps: int = _opt(0, "Total optimizer steps; 0 derives them from num_epochs.")
    batch_size: int = _opt(8, "Examples per micro-batch (per device).")
    gradient_accumulation_steps: int = _opt(1, "Micro-batches per optimizer step.")
    lr_scheduler: str = _opt("cosine", "Decay after warm-up: cosine | linear | constant.")
    warmup_steps: int = _opt(0, "Linear warm-up steps (overrides warmup_ratio when > 0).")
    warmup_ratio: float = _opt(0.0, "Warm-up as a fraction of the total steps.")
    max_grad_norm: float = _opt(1.0, "Clip the global gradient norm to this; 0 disables.")
    gradient_checkpointing: bool = _opt(False, "Recompute activations in backward (non-reentrant).")
    seed: int = _opt(42, "Seed for python/numpy/torch RNGs and the data order.")
    logging_steps: int = _opt(10, "Log train loss, lr and throughput every N steps.")
    eval_steps: int = _opt(0, "Evaluate every N steps (0: only at the end).")
    eval_batch_size: int = _opt(8, "Examples per evaluation forward / generate call.")
    eval_max_new_tokens: int = _opt(64, "Generation budget for exact-match evaluation.")
    eval_generation_samples: int = _opt(64, "Records used for exact-match evaluation (0: all).")
    save_steps: int = _opt(0, "Save a checkpoint every N steps (0: only at the end).")
    save_total_limit: int = _opt(2, "Keep only the last K checkpoints (0: keep all).")
    early_stopping_patience: int = _opt(0, "Stop after N evals without eval-loss gain (0: off).")
    early_stopping_threshold: float = _opt(0.0, "Minimum eval-loss decrease that counts as gain.")
    precision: str = _opt("auto", "auto (bf16 autocast on a bf16 GPU, else fp32) | fp32 | bf16.")
    selective_lm_head: bool = _opt(True, "Run the LM head only where loss is taken (verified).")
    keep_freed_memory: bool = _opt(
        True, "CPU: glibc keeps freed buffers for the next step (no page faults; RSS stays)."
    )
    progress_bar: bool = _opt(True, "Show a tqdm progress bar.")

    def __post_init__(self) -> None:
        # YAML 1.1 reads "1e-3" as a string and CLI overrides arrive as text: coerce numbers.
        for f in fields(self):
            value, kind = getattr(self, f.name), type(f.default)
            if kind in (int, float) and isinstance(value, str):
                try:
                    setattr(self, f.name, kind(float(value)) if kind is int else float(value))
                except ValueError:
                    raise ValueError(f"{f.name} must be a number, got {value!r}") from None
            elif kind is float and isinstance(value, int) and not isinstance(value, bool):
                setattr(self, f.name, float(value))

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field."""
        if self.lr_scheduler not in SCHEDULERS:
            raise ValueError(f"lr_scheduler must be one of {SCHEDULERS}, got {self.lr_scheduler!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        for name in ("batch_size", "gradient_accumulation_steps", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "warmup_steps", "logging_steps", "eval_steps", "save_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_steps == 0 and self.num_epochs <= 0:
            raise ValueError("set max_steps > 0 or num_epochs > 0")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a dict, rejecting unknown keys with the list of valid ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {unknown}; valid: {sorted(known)}")
        return cls(**values)


@dataclass
class TrainState:
    """What callbacks see at the end of every optimizer step; set ``should_stop`` to stop."""

    step: int
    max_steps: int
    epoch: int
    loss: float
    lr: float
    should_stop: bool = False


class Callback(Protocol):
    """Training hooks; implement either method or both."""

    def on_log(self, event: dict[str, Any]) -> None:
        """Called with every event written to ``metrics.jsonl``."""

    def on_step_end(self, state: TrainState) -> None:
        """Called after each optimizer step, once its logging/eval/checkpoint is done."""


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


class GradientFlowError(TilpassError, RuntimeError):
    """Trainable parameters received no gradient: they would silently never train."""


# ----------------------------------------------------------------------------- helpers


def seed_everything(seed: int) -> None:
    """Seed python, numpy (if installed) and torch (CPU and CUDA)."""
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass
    torch.manual_seed(seed)


def epoch_batches(num_examples: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Micro-batches of example indices for one epoch; a pure function of (seed, epoch)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(num_examples, generator=gen).tolist()
    return [perm[i : i + batch_size] for i in range(0, num_examples, batch_size)]


def consumed_examples(num_examples: int, steps: int, config: TrainConfig) -> list[int]:
    """Indices of the examples the first `steps` optimizer steps train on, in order.

    The data order depends only on the seed and the epoch, so this replays it exactly (the
    change record counts trained tokens with it, resumed runs included).
    """
    accum = config.gradient_accumulation_steps
    per_epoch = math.ceil(math.ceil(num_examples / config.batch_size) / accum)
    out: list[int] = []
    for step in range(steps):
        batches = epoch_batches(num_examples, config.batch_size, config.seed, step // per_epoch)
        first = (step % per_epoch) * accum
        out += [i for batch in batches[first : first + accum] for i in batch]
    return out


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based)."""
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _autocast(config: TrainConfig, device: torch.device) -> AbstractContextManager[Any] | None:
    use_bf16 = config.precision == "bf16" or (
        config.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else None


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB else


def _enable_checkpointing(model: nn.Module) -> None:
    base = unwrap_base(model)
    kwargs = {"use_reentrant": False}
    if callable(getattr(base, "activation_checkpointing_enable", None)):
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif callable(getattr(base, "gradient_checkpointing_enable", None)):
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ValueError(
            f"gradient_checkpointing=True but {type(base).__name__} has no "
            "gradient_checkpointing_enable(); use a transformers model or set it to False."
        )


def check_gradient_flow(named: Sequence[tuple[str, nn.Parameter]], allow_zero: bool) -> list[str]:
    """Raise :class:`GradientFlowError` for trainable parameters without a gradient.

    Returns the names whose gradient is exactly zero (an error unless ``allow_zero``).
    """
    missing = [n for n, p in named if p.grad is None]
    zero = [n for n, p in named if p.grad is not None and not bool(p.grad.any())]
    bad = missing + ([] if allow_zero else zero)
    if bad:
        shown = ", ".join(bad[:10]) + (f" (+{len(bad) - 10} more)" if len(bad) > 10 else "")
        raise GradientFlowError(
            f"{len(bad)} of {len(named)} trainable parameters received no gradient: {shown}. "
            "They are unused by the forward pass, or cut off from the loss: reentrant "
            "gradient checkpointing with frozen inputs does this (use non-reentrant "
            "checkpointing or model.enable_input_require_grads()); else freeze them."
        )
    return zero


def _default_record_fns() -> tuple[Callable[[Any, Any], list[int]], Callable[[Any], str]]:
    try:
        from tilpass.data import prompt_ids, reference_answer
    except ImportError as exc:
        raise ImportError(
            "generation eval needs prompt_fn/answer_fn, or tilpass.data.prompt_ids / "
            f"reference_answer ({exc}); pass prompt_fn= and answer_fn= to train()."
        ) from exc
    return prompt_ids, reference_answer


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
    callbacks: Iterable[Callback] = (),
    *,
    prompt_fn: Callable[[Any, Any], list[int]] | None = None,
    answer_fn: Callable[[Any], str] | None = None,
) -> TrainResult:
    """Train every parameter with ``requires_grad=True``; evaluate, log and checkpoint.

    Args:
        model: A causal LM (adapter wrapper or plain model), already on its device.
        train_dataset: Items ``{"input_ids": [...], "labels": [...]}`` (-100 = no loss).
        eval_dataset: Same format, for eval loss/perplexity; None skips it.
        collate_fn: Pads a list of items into tensors (``input_ids``, ``attention_mask``,
            ``labels``), right-padded.
        config: Hyper-parameters.
        output_dir: Receives ``metrics.jsonl``, ``loss.png`` and ``checkpoint-N/``.
        tokenizer: With ``eval_records``, enables greedy exact-match evaluation.
        eval_records: Raw records for generation eval.
        resume: ``"auto"`` (latest complete checkpoint in output_dir, if any) or a path.
        callbacks: Objects with ``on_log(event)`` and/or ``on_step_end(state)``.
        prompt_fn: ``(record, tokenizer) -> ids``; defaults to ``tilpass.data.prompt_ids``.
        answer_fn: ``record -> str``; defaults to ``tilpass.data.reference_answer``.

    Returns:
        A :class:`TrainResult` (final step, losses, last eval metrics, last checkpoint).

    Raises:
        GradientFlowError: Some trainable parameter gets no gradient (checked on early steps).
        ValueError: Invalid config, empty data, or a checkpoint that does not fit this run.
    """
    from tqdm.auto import tqdm

    config.validate()
    t0 = time.perf_counter()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = len(train_dataset)  # type: ignore[arg-type]
    if n == 0:
        raise ValueError("train_dataset is empty: check the data file and its filters")
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters (requires_grad=True)")
    if config.keep_freed_memory and named[0][1].device.type == "cpu":
        keep_freed_memory()  # no page faults for each step's buffers (tilpass.runtime)
    gen_eval = tokenizer is not None and bool(eval_records)
    if gen_eval and (prompt_fn is None or answer_fn is None):
        default_prompt, default_answer = _default_record_fns()
        prompt_fn, answer_fn = prompt_fn or default_prompt, answer_fn or default_answer
    callbacks = list(callbacks)
    seed_everything(config.seed)
    device = model_device(model)
    autocast = _autocast(config, device)
    if config.gradient_checkpointing:
        _enable_checkpointing(model)

    accum = config.gradient_accumulation_steps
    steps_per_epoch = math.ceil(math.ceil(n / config.batch_size) / accum)
    max_steps = config.max_steps or math.ceil(config.num_epochs * steps_per_epoch)
    warmup = config.warmup_steps or math.ceil(config.warmup_ratio * max_steps)
    named = [x for x in named if x[1].ndim >= 2] + [x for x in named if x[1].ndim < 2]
    groups = [
        {"params": [p for _, p in named if p.ndim >= 2], "weight_decay": config.weight_decay},
        {"params": [p for _, p in named if p.ndim < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_epsilon,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, max_steps, warmup, config.lr_scheduler)
    )
    data_info = {"seed": config.seed, "num_examples": n, "batch_size": config.batch_size}
    data_info["gradient_accumulation_steps"] = accum
    selective: bool | None = None if config.selective_lm_head else False
    start, best, bad_evals, evaled_at = 0, None, 0, -1
    metrics_path = out / METRICS_FILE

    remove_stale(out)
    ckpt = resolve_resume(resume, out)
    if ckpt is not None:
        st = json.loads((ckpt / "trainer_state.json").read_text())
        if st["data"] != data_info:
            raise ValueError(
                f"{ckpt} was written with data settings {st['data']} but this run has "
                f"{data_info}; resuming would not replay the same data order. Use the same "
                "dataset, batch_size, gradient_accumulation_steps and seed, or a new output_dir."
            )
        load_checkpoint(ckpt, named, optimizer, scheduler, device)
        start, best = st["global_step"], st["best_eval_loss"]
        bad_evals, evaled_at = st["evals_without_improvement"], st["last_eval_step"]
        selective = st["selective_lm_head"] if config.selective_lm_head else False
        truncate_metrics(metrics_path, start)
    elif metrics_path.exists():
        metrics_path.unlink()  # a fresh run starts a fresh log

    log_file = metrics_path.open("a")

    def log(event: dict[str, Any]) -> None:
        event = clean_json(event)
        log_file.write(json.dumps(event) + "\n")
        log_file.flush()
        for cb in callbacks:
            if callable(getattr(cb, "on_log", None)):
                cb.on_log(event)

    def run_eval(at: int) -> dict[str, Any]:
        ev: dict[str, Any] = {}
        if eval_dataset is not None and len(eval_dataset) > 0:  # type: ignore[arg-type]
            m = evaluate_loss(
                model,
                eval_dataset,
                collate_fn,
                config.eval_batch_size,
                selective=selective,
                autocast=autocast,
            )
            ev |= {"eval_loss": m["loss"], "eval_perplexity": m["perplexity"]}
            ev["eval_tokens"] = m["tokens"]
        if gen_eval and eval_records is not None:
            k = config.eval_generation_samples
            with autocast or nullcontext():
                g = evaluate_generation(
                    model,
                    tokenizer,
                    list(eval_records[:k] if k else eval_records),
                    prompt_fn,
                    answer_fn,  # type: ignore[arg-type]
                    config.eval_max_new_tokens,
                    config.eval_batch_size,
                )
            ev |= {"exact_match": g["exact_match"], "exact_match_n": g["n"]}
            ev["examples"] = g["examples"][:3]
        if ev:
            log({"event": "eval", "step": at, **ev})
        return ev

    def save(at: int) -> Path:
        state = {
            "format": 1,
            "global_step": at,
            "epoch": at // steps_per_epoch,
            "batch_in_epoch": (at % steps_per_epoch) * accum,
            "data": data_info,
            "max_steps": max_steps,
            "best_eval_loss": best,
            "evals_without_improvement": bad_evals,
            "last_eval_step": evaled_at,
            "selective_lm_head": selective,
            "config": asdict(config),
        }
        path = save_checkpoint(out, at, named, optimizer, scheduler, state, config.save_total_limit)
        log({"event": "checkpoint", "step": at, "path": str(path)})
        return path

    n_trainable = sum(p.numel() for _, p in named)
    log(
        {
            "event": "start",
            "step": start,
            "max_steps": max_steps,
            "num_examples": n,
            "steps_per_epoch": steps_per_epoch,
            "trainable_params": n_trainable,
            "total_params": sum(p.numel() for p in model.parameters()),
            "precision": "bf16" if autocast is not None else "fp32",
            "device": str(device),
            "resumed_from": str(ckpt) if ckpt else None,
        }
    )

    model.train()
    step, stop, stopped_early = start, False, False
    last_ckpt: Path | None = ckpt
    saved_at = start if ckpt is not None else -1
    train_loss: float | None = None
    last_eval: dict[str, Any] = {}
    pending: list[tuple[str, nn.Parameter]] | None = named  # gradient-flow audit
    checks = 0
    win_loss = torch.zeros((), dtype=torch.float64, device=device)
    win_tokens = win_seen = 0
    win_t = time.perf_counter()
    params = [p for _, p in named]
    pbar = tqdm(total=max_steps, initial=step, disable=not config.progress_bar, desc="train")
    try:
        while step < max_steps and not stop:
            epoch = step // steps_per_epoch
            batches = epoch_batches(n, config.batch_size, config.seed, epoch)
            for first in range((step % steps_per_epoch) * accum, len(batches), accum):
                micro = [
                    trim_padding(collate_fn([train_dataset[i] for i in idx]))
                    for idx in batches[first : first + accum]
                ]
                n_tok = sum(count_loss_tokens(b) for b in micro)
                win_seen += sum(
                    int(b.get("attention_mask", b["input_ids"]).bool().sum()) for b in micro
                )
                if selective is None:
                    selective = selective_loss_matches(model, to_device(micro[0], device), autocast)
                step_loss = torch.zeros((), dtype=torch.float64, device=device)
                for b in micro:
                    with autocast or nullcontext():
                        loss, _ = causal_lm_loss(model, to_device(b, device), selective)
                    # Normalise by the loss tokens of the whole step: accumulation 4 x batch 2
                    # is then the same update as batch 8.
                    (loss / max(n_tok, 1)).backward()
                    step_loss += loss.detach().double()
                if pending and n_tok > 0:
                    checks += 1
                    zero = check_gradient_flow(pending, allow_zero=checks < _GRAD_CHECK_STEPS)
                    pending = [(nm, p) for nm, p in named if nm in set(zero)]
                clip = config.max_grad_norm if config.max_grad_norm > 0 else float("inf")
                grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                win_loss += step_loss
                win_tokens += n_tok
                pbar.update(1)
                if config.logging_steps and (step % config.logging_steps == 0 or step == max_steps):
                    now = time.perf_counter()
                    train_loss = float(win_loss) / max(win_tokens, 1)
                    tps, mem = win_seen / max(now - win_t, 1e-9), _peak_memory_mb(device)
                    log(
                        {
                            "event": "train",
                            "step": step,
                            "epoch": step / steps_per_epoch,
                            "loss": train_loss,
                            "lr": lr,
                            "grad_norm": float(grad_norm),
                            "tokens_per_s": tps,
                            "loss_tokens": win_tokens,
                            "peak_mem_mb": mem,
                            "elapsed_s": now - t0,
                        }
                    )
                    pbar.set_postfix(
                        loss=f"{train_loss:.4f}",
                        lr=f"{lr:.2e}",
                        tok_s=f"{tps:.0f}",
                        mem=f"{mem:.0f}MB",
                    )
                    win_loss.zero_()
                    win_tokens = win_seen = 0
                    win_t = now
                if config.eval_steps and step % config.eval_steps == 0:
                    last_eval, evaled_at = run_eval(step), step
                    loss_now = last_eval.get("eval_loss")
                    if loss_now is not None and math.isfinite(loss_now):
                        if best is None or loss_now < best - config.early_stopping_threshold:
                            best, bad_evals = loss_now, 0
                        else:
                            bad_evals += 1
                        patience = config.early_stopping_patience
                        if patience and bad_evals >= patience:
                            stop = stopped_early = True
                            log({"event": "early_stop", "step": step, "best_eval_loss": best})
                if config.save_steps and step % config.save_steps == 0:
                    last_ckpt, saved_at = save(step), step
                state = TrainState(step, max_steps, epoch, float(step_loss) / max(n_tok, 1), lr)
                for cb in callbacks:
                    if callable(getattr(cb, "on_step_end", None)):
                        cb.on_step_end(state)
                stop = stop or state.should_stop
                if step >= max_steps or stop:
                    break
        if evaled_at != step:
            last_eval, evaled_at = run_eval(step), step
            final_loss = last_eval.get("eval_loss")
            if final_loss is not None and math.isfinite(final_loss):
                best = final_loss if best is None else min(best, final_loss)
        if saved_at != step:
            last_ckpt = save(step)
        runtime = time.perf_counter() - t0
        log({"event": "end", "step": step, "runtime_s": runtime, "stopped_early": stopped_early})
    finally:
        pbar.close()
        log_file.close()
    plot = plot_losses(metrics_path, out / PLOT_FILE)
    return TrainResult(
        global_step=step,
        train_loss=train_loss,
        eval_metrics=last_eval,
        best_eval_loss=best,
        stopped_early=stopped_early,
        checkpoint_dir=last_ckpt,
        metrics_path=metrics_path,
        plot_path=plot,
        runtime_s=runtime,
    )
