"""AdaLoRA's trainer hooks: the orthogonality regulariser and the rank allocator.

    R = orth_reg_weight * mean over every P and Q of ||P P^T - I||_F  (||Q^T Q - I||_F for Q)

is added to the loss (`loss_term`), as PEFT adds it to the model's loss. The importance scores
are updated from the gradients after backward and before the optimizer step (`after_backward`,
the paper's order: the score is |w dL/dw| at the weights the gradient was taken at); the budget
masking runs after the optimizer step (`on_step_end`), as PEFT's `update_and_allocate` does, so
a pruned triplet is zero in the next forward and in the saved file. An unset `total_step` is
taken from the run's step plan (the trainer's start event).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch import nn

from tilpass.inject import adapter_layers
from tilpass.methods.adalora.allocator import RankAllocator
from tilpass.methods.adalora.config import AdaLoraConfig
from tilpass.methods.adalora.layer import AdaLoraLinear


def adalora_layers(model: nn.Module, name: str) -> list[tuple[str, AdaLoraLinear]]:
    """(module path, layer) of every AdaLoRA layer holding adapter `name`, in path order."""
    base = getattr(model, "base_model", model)
    found = [
        (path, layer)
        for path, layer in adapter_layers(base)
        if isinstance(layer, AdaLoraLinear) and name in layer.specs
    ]
    return sorted(found, key=lambda item: item[0])


def orthogonal_regulariser(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Mean over all P and Q of ||P P^T - I||_F and ||Q^T Q - I||_F (PEFT's, unweighted).

    Matrices of one shape go through one batched product instead of one small call each.
    """
    groups: dict[tuple[str, tuple[int, ...]], list[torch.Tensor]] = defaultdict(list)
    for p, q in pairs:
        groups["P", tuple(p.shape)].append(p)
        groups["Q", tuple(q.shape)].append(q)
    total: torch.Tensor | None = None
    for (kind, _), mats in groups.items():
        stack = torch.stack(mats)  # (n, r, in) for P, (n, out, r) for Q
        if kind == "Q":
            stack = stack.transpose(1, 2)  # (n, r, out)
        gram = torch.bmm(stack, stack.transpose(1, 2))  # (n, r, r)
        eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
        norms = torch.linalg.matrix_norm(gram - eye).sum()
        total = norms if total is None else total + norms
    if total is None:
        raise ValueError("the orthogonality regulariser needs at least one AdaLoRA layer")
    return total / (2 * len(pairs))


class AdaLoraTraining:
    """The trainer hooks of one AdaLoRA adapter (see the module docstring)."""

    name = "adalora_orth_reg"  # the loss term's name in metrics.jsonl

    def __init__(self, model: nn.Module, adapter_name: str) -> None:
        config = model.peft_config[adapter_name]
        assert isinstance(config, AdaLoraConfig)
        self.config = config
        self.layers = adalora_layers(model, adapter_name)
        self.allocator = RankAllocator(self.layers, adapter_name, config)
        triplets = [layer.triplets(adapter_name) for _, layer in self.layers]
        self.pairs = [(p, q) for p, _, q in triplets]

    def loss_term(self, step: int) -> torch.Tensor | None:
        """orth_reg_weight times the regulariser (None when the weight is 0)."""
        if self.config.orth_reg_weight == 0 or not self.pairs:
            return None
        return self.config.orth_reg_weight * orthogonal_regulariser(self.pairs)

    def after_backward(self, step: int) -> None:
        """Importance scores from this step's gradients (before the optimizer step)."""
        if self.allocator.wants_scores(step):
            self.allocator.update_scores()

    def on_step_end(self, state: Any) -> None:
        """Budget and masking for the step just taken (`state.step` counts it already)."""
        self.allocator.allocate(state.step - 1)

    def on_log(self, event: dict[str, Any]) -> None:
        """At the run's start: take an unset total_step from the step plan, and check it."""
        if event.get("event") != "start":
            return
        if self.config.total_step is None:
            steps = int(event["max_steps"])
            self.config.check_steps(steps, "the run's step plan (training.max_steps)")
            self.config.total_step = steps


def training_hooks(model: nn.Module, adapter_name: str) -> list[Any]:
    """The registry's entry: the hooks for training adapter `adapter_name`."""
    return [AdaLoraTraining(model, adapter_name)]
