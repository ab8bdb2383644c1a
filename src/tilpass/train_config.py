"""What a training run is set to do, fixed before it starts: settings, data order, schedule.

:class:`TrainConfig` holds the hyper-parameters. The data order is a pure function of
``(seed, epoch)`` (:func:`epoch_batches`), and :class:`StepPlan` divides it into optimizer
steps, so a resumed run, or the change record counting trained tokens
(:func:`consumed_examples`), replays exactly what an uninterrupted run trains on.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, fields
from typing import Any

import torch

from tilpass.config_fields import FieldError, coerce_fields, opt

SCHEDULERS = ("cosine", "linear", "constant")
PRECISIONS = ("auto", "fp32", "bf16")
NONFINITE = ("stop", "skip")
# Settings that fix the order of the data: a checkpoint resumes only a run with the same.
DATA_ORDER_KEYS = ("seed", "batch_size", "gradient_accumulation_steps")


@dataclass
class TrainConfig:
    """Hyper-parameters of :func:`train`; each field's ``help`` is shown by ``tilpass train``."""

    learning_rate: float = opt(2e-4, "Peak AdamW learning rate.")
    weight_decay: float = opt(0.0, "AdamW weight decay, applied to matrices (not biases/norms).")
    adam_beta1: float = opt(0.9, "AdamW beta1.")
    adam_beta2: float = opt(0.999, "AdamW beta2.")
    adam_epsilon: float = opt(1e-8, "AdamW epsilon.")
    num_epochs: float = opt(1.0, "Passes over the training set (used when max_steps is 0).")
    max_steps: int = opt(0, "Total optimizer steps; 0 derives them from num_epochs.")
    batch_size: int = opt(8, "Examples per micro-batch (per device).")
    gradient_accumulation_steps: int = opt(1, "Micro-batches per optimizer step.")
    lr_scheduler: str = opt("cosine", "Decay after warm-up: cosine | linear | constant.")
    warmup_steps: int = opt(0, "Linear warm-up steps (overrides warmup_ratio when > 0).")
    warmup_ratio: float = opt(0.0, "Warm-up as a fraction of the total steps.")
    max_grad_norm: float = opt(1.0, "Clip the global gradient norm to this; 0 disables.")
    gradient_checkpointing: bool = opt(False, "Recompute activations in backward (non-reentrant).")
    seed: int = opt(42, "Seed for python/numpy/torch RNGs and the data order.")
    logging_steps: int = opt(10, "Log train loss, lr and throughput every N steps.")
    eval_steps: int = opt(0, "Evaluate every N steps (0: only at the end).")
    eval_batch_size: int = opt(8, "Examples per evaluation forward / generate call.")
    eval_max_new_tokens: int = opt(64, "Generation budget for exact-match evaluation.")
    eval_generation_samples: int = opt(64, "Records used for exact-match evaluation (0: all).")
    save_steps: int = opt(0, "Save a checkpoint every N steps (0: only at the end).")
    save_total_limit: int = opt(2, "Keep only the last K checkpoints (0: keep all).")
    early_stopping_patience: int = opt(0, "Stop after N evals without eval-loss gain (0: off).")
    early_stopping_threshold: float = opt(0.0, "Minimum eval-loss decrease that counts as gain.")
    precision: str = opt("auto", "auto (bf16 autocast on a bf16 GPU, else fp32) | fp32 | bf16.")
    selective_lm_head: bool = opt(True, "Run the LM head only where loss is taken (verified).")
    keep_freed_memory: bool = opt(
        True, "CLI on CPU: glibc keeps freed buffers for reuse (no page faults; RSS stays)."
    )
    progress_bar: bool = opt(True, "Show a tqdm progress bar.")
    on_nonfinite: str = opt(
        "stop", "NaN/inf loss or gradient: stop (error naming the step) | skip (drop the update)."
    )

    def __post_init__(self) -> None:
        # YAML 1.1 reads "1e-3" as a string and CLI overrides arrive as text: coerce numbers.
        coerce_fields(self)

    def validate(self) -> None:
        """Raise `FieldError` (a ValueError) naming the first invalid field."""
        for name, choices in (
            ("lr_scheduler", SCHEDULERS),
            ("precision", PRECISIONS),
            ("on_nonfinite", NONFINITE),
        ):
            if getattr(self, name) not in choices:
                raise FieldError(
                    name, f"{name} must be one of {choices}, got {getattr(self, name)!r}"
                )
        for name in ("batch_size", "gradient_accumulation_steps", "eval_batch_size"):
            _at_least(self, name, 1)
        for name in ("max_steps", "warmup_steps", "logging_steps", "eval_steps", "save_steps"):
            _at_least(self, name, 0)
        for name in ("save_total_limit", "early_stopping_patience", "eval_generation_samples"):
            _at_least(self, name, 0)
        for name in ("weight_decay", "max_grad_norm", "early_stopping_threshold", "num_epochs"):
            _at_least(self, name, 0.0)
        _at_least(self, "eval_max_new_tokens", 1)
        if self.max_steps == 0 and self.num_epochs <= 0:
            raise FieldError("max_steps", "set max_steps > 0 or num_epochs > 0")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise FieldError(
                "warmup_ratio", f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}"
            )
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise FieldError(name, f"{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("learning_rate", "adam_epsilon"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise FieldError(name, f"{name} must be a finite number > 0, got {value}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a dict, rejecting unknown keys with the list of valid ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {unknown}; valid: {sorted(known)}")
        return cls(**values)


def _at_least(config: TrainConfig, name: str, low: float) -> None:
    value = getattr(config, name)
    if not value >= low or (isinstance(value, float) and not math.isfinite(value)):
        raise FieldError(name, f"{name} must be >= {low}, got {value}")


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


@dataclass(frozen=True)
class StepPlan:
    """How the training set divides into optimizer steps; fixed for a run."""

    num_examples: int
    batch_size: int
    accumulation: int  # micro-batches per optimizer step
    steps_per_epoch: int  # the last step of an epoch may have fewer micro-batches
    max_steps: int
    warmup: int

    @classmethod
    def of(cls, num_examples: int, config: TrainConfig) -> StepPlan:
        """The plan of ``config`` on a training set of ``num_examples``."""
        accum = config.gradient_accumulation_steps
        per_epoch = math.ceil(math.ceil(num_examples / config.batch_size) / accum)
        max_steps = config.max_steps or math.ceil(config.num_epochs * per_epoch)
        warmup = config.warmup_steps or math.ceil(config.warmup_ratio * max_steps)
        return cls(num_examples, config.batch_size, accum, per_epoch, max_steps, warmup)

    def micro_batches(self, seed: int, step: int) -> list[list[int]]:
        """Example indices of each micro-batch of optimizer step ``step`` (0-based)."""
        batches = epoch_batches(
            self.num_examples, self.batch_size, seed, step // self.steps_per_epoch
        )
        first = (step % self.steps_per_epoch) * self.accumulation
        return batches[first : first + self.accumulation]


def consumed_examples(num_examples: int, steps: int, config: TrainConfig) -> list[int]:
    """Indices of the examples the first `steps` optimizer steps train on, in order.

    The data order depends only on the seed and the epoch, so this replays it exactly (the
    change record counts trained tokens with it, resumed runs included).
    """
    plan = StepPlan.of(num_examples, config)
    return [i for step in range(steps) for b in plan.micro_batches(config.seed, step) for i in b]


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
