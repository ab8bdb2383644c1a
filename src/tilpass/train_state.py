"""What a running training loop keeps: its position, early stopping, log windows, audits.

A checkpoint saves :class:`LoopState`; :class:`LogWindow` sums the optimizer steps between two
train events without a device sync per step; :class:`GradientAudit` checks on the first
steps that every trainable parameter receives a gradient.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tilpass.errors import TilpassError

# A zero gradient is legitimate on the first step (LoRA's A while B == 0), so a parameter
# whose gradient is exactly zero is re-checked until this step before it counts as unused.
GRAD_CHECK_STEPS = 3


class GradientFlowError(TilpassError, RuntimeError):
    """Trainable parameters received no gradient: they would silently never train."""


class DivergenceError(TilpassError, RuntimeError):
    """The loss, the gradients or the trained weights stopped being finite numbers."""


def nonfinite_parameters(named: Sequence[tuple[str, nn.Parameter]]) -> list[str]:
    """Names of the parameters holding a NaN or an infinity."""
    with torch.no_grad():
        return [name for name, p in named if not bool(torch.isfinite(p).all())]


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


@dataclass
class GradientAudit:
    """Checks on the first steps that every trainable parameter receives a gradient."""

    named: list[tuple[str, nn.Parameter]]
    pending: list[tuple[str, nn.Parameter]] = field(default_factory=list)
    checks: int = 0

    def __post_init__(self) -> None:
        self.pending = list(self.named)

    def check(self, loss_tokens: int) -> None:
        """Raise :class:`GradientFlowError` for parameters left without a gradient."""
        if not self.pending or loss_tokens == 0:
            return
        self.checks += 1
        zero = set(check_gradient_flow(self.pending, allow_zero=self.checks < GRAD_CHECK_STEPS))
        self.pending = [(name, p) for name, p in self.named if name in zero]

    def find_unused(self, loss_tokens: int) -> GradientFlowError | None:
        """:meth:`check`, returning the error instead of raising it (the caller decides)."""
        try:
            self.check(loss_tokens)
        except GradientFlowError as exc:
            return exc
        return None


@dataclass
class StepOutput:
    """What one optimizer step measured (tensors stay on the device: no sync per step)."""

    loss: torch.Tensor  # summed next-token loss over the step's micro-batches (float64)
    loss_tokens: int
    seen_tokens: int  # non-padding input tokens (throughput)
    terms: dict[str, torch.Tensor]  # the hooks' loss terms of this step (float64)
    lr: float = 0.0
    grad_norm: torch.Tensor | None = None
    positions: int = 0  # token positions computed, padding included (padding fraction)


@dataclass
class LogWindow:
    """Sums over the optimizer steps since the last train event."""

    loss: torch.Tensor  # summed next-token loss (float64, on the training device)
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: int = 0
    seen: int = 0
    positions: int = 0
    steps: int = 0
    started: float = field(default_factory=time.perf_counter)

    def add(self, out: StepOutput) -> None:
        """Count one optimizer step."""
        self.loss += out.loss
        for name, value in out.terms.items():
            self.terms[name] = self.terms[name] + value if name in self.terms else value
        self.tokens += out.loss_tokens
        self.seen += out.seen_tokens
        self.positions += out.positions
        self.steps += 1

    def means(self, term_names: Sequence[str]) -> tuple[float, dict[str, float]]:
        """Loss per loss token plus the mean loss terms per step, and those terms by name
        (NaN when every step of the window was skipped for a non-finite loss)."""
        if self.steps == 0:
            return float("nan"), dict.fromkeys(term_names, float("nan"))
        terms = {
            n: float(self.terms[n]) / self.steps if n in self.terms else 0.0 for n in term_names
        }
        return float(self.loss) / max(self.tokens, 1) + sum(terms.values()), terms

    def padding_fraction(self) -> float:
        """Share of the computed token positions that were padding."""
        return 1.0 - self.seen / self.positions if self.positions else 0.0

    def reset(self, now: float) -> None:
        """Start a new window at time ``now``."""
        self.loss.zero_()
        self.terms.clear()
        self.tokens = self.seen = self.positions = self.steps = 0
        self.started = now


@dataclass
class LoopState:
    """Where a run stands: the step, early stopping, the last outputs (a checkpoint saves it)."""

    step: int = 0
    best: float | None = None  # best eval loss so far
    bad_evals: int = 0  # evaluations since the best one
    evaled_at: int = -1  # step of the last evaluation
    saved_at: int = -1  # step of the last checkpoint
    selective: bool | None = None  # selective LM head; None until checked on the first batch
    stop: bool = False
    stopped_early: bool = False
    train_loss: float | None = None  # last logged train loss
    skipped_steps: int = 0  # steps dropped for a non-finite loss or gradient (on_nonfinite: skip)
    last_eval: dict[str, Any] = field(default_factory=dict)
    last_checkpoint: Path | None = None
