"""Training hooks: how methods and users act at named points of each optimizer step.

A hook is any object with some of these methods (see :class:`TrainingHook`): a loss term
added before backward, a step after backward and before clipping (AdaLoRA's importance
scores need exactly that), and notifications at the end of each step and for each logged
event. The trainer collects them once per run into a :class:`HookSet`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn


@dataclass
class TrainState:
    """What ``on_step_end`` hooks see after every optimizer step; set ``should_stop`` to stop.

    ``loss`` is the step's mean loss per loss token plus its hooks' loss terms.
    """

    step: int
    max_steps: int
    epoch: int
    loss: float
    lr: float
    should_stop: bool = False


class TrainingHook(Protocol):
    """What a hook may implement; every method is optional (implement any subset).

    Hooks come from the ``hooks`` argument of :class:`Trainer` (``callbacks`` of
    :func:`train`) and from ``model.training_hooks()`` when the model has that method (called
    once, at setup; the model's hooks run first). In the methods, ``step`` counts the optimizer
    steps completed before the current one (0 during the first step), as the learning-rate
    schedule does. A hook's optional ``name`` attribute (a string) names its loss term in the
    log; the default is its class name.
    """

    def loss_term(self, step: int) -> torch.Tensor | None:
        """A scalar added to the loss before backward, or None for no term this time.

        Called after each micro-batch's forward; the trainer adds ``term / k`` to each of the
        step's ``k`` micro-batch losses, so a term that depends only on parameters enters each
        optimizer step exactly once, whatever the gradient accumulation (and a term computed
        from the forward just run averages over the micro-batches). Its value per step is
        logged in the train event under ``loss_terms`` and included in ``loss``.
        """

    def after_backward(self, step: int) -> None:
        """Called once per optimizer step, after all micro-batches' backward, before clipping.

        The gradients are complete here (``p.grad``) and may be read or modified.
        """

    def on_step_end(self, state: TrainState) -> None:
        """Called after each optimizer step, once its logging/eval/checkpoint is done."""

    def on_log(self, event: dict[str, Any]) -> None:
        """Called with every event written to ``metrics.jsonl``."""


# The name the hook protocol had when hooks could only log and stop.
Callback = TrainingHook


@dataclass
class HookSet:
    """A run's hooks, grouped by phase as bound methods (looked up once, not every step)."""

    loss_terms: list[tuple[str, Callable[[int], torch.Tensor | None]]] = field(default_factory=list)
    after_backward: list[Callable[[int], None]] = field(default_factory=list)
    on_step_end: list[Callable[[TrainState], None]] = field(default_factory=list)
    on_log: list[Callable[[dict[str, Any]], None]] = field(default_factory=list)

    @classmethod
    def collect(cls, model: nn.Module, hooks: Iterable[TrainingHook]) -> HookSet:
        """The model's ``training_hooks()`` (if it has that method), then ``hooks``."""
        get_model_hooks = getattr(model, "training_hooks", None)
        found = list(get_model_hooks()) if callable(get_model_hooks) else []
        out = cls()
        for hook in [*found, *hooks]:
            term = getattr(hook, "loss_term", None)
            if callable(term):
                out.loss_terms.append((out._term_name(hook), term))
            for phase in ("after_backward", "on_step_end", "on_log"):
                method = getattr(hook, phase, None)
                if callable(method):
                    getattr(out, phase).append(method)
        return out

    def _term_name(self, hook: object) -> str:
        """The hook's ``name`` (else its class name), made unique among the loss terms."""
        name = getattr(hook, "name", None)
        base = name if isinstance(name, str) and name else type(hook).__name__
        taken = {n for n, _ in self.loss_terms}
        unique, k = base, 1
        while unique in taken:
            k += 1
            unique = f"{base}.{k}"
        return unique

    def loss_term_total(
        self, step: int, terms: dict[str, torch.Tensor], parts: int
    ) -> torch.Tensor | float:
        """The loss terms at ``step`` for one of a step's ``parts`` micro-batches, each
        ``/ parts``; each term's detached share is added to ``terms`` under its name."""
        total: torch.Tensor | float = 0.0
        for name, loss_term in self.loss_terms:
            term = loss_term(step)
            if term is None:
                continue
            if not torch.is_tensor(term) or term.numel() != 1:
                raise TypeError(
                    f"training hook {name!r}: loss_term() must return a scalar tensor or None, "
                    f"got {type(term).__name__} {tuple(getattr(term, 'shape', ()))}"
                )
            share = term.reshape(()) / parts
            total = total + share
            value = share.detach().double()
            terms[name] = terms[name] + value if name in terms else value
        return total
