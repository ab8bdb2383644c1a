"""AdaLoRA's rank allocation (Zhang et al., 2023, "Adaptive Budget Allocation for PEFT").

Each parameter entry w gets an importance I = |w * dL/dw|, smoothed and paired with its
uncertainty (beta1, beta2 = `AdaLoraConfig`'s):

    Ibar_t = beta1 Ibar_{t-1} + (1 - beta1) I_t                 (sensitivity smoothing)
    U_t    = beta2 U_{t-1}    + (1 - beta2) |I_t - Ibar_t|      (uncertainty)
    s(w)   = Ibar_t * U_t

A triplet i of a module scores s(Lambda_i) + mean_j s(P_ij) + mean_k s(Q_ki). Every `deltaT`
steps the total budget b(t) of kept triplets follows the cubic schedule

    b(t) = init_b                                                    t <= tinit
    b(t) = target_b + (init_b - target_b) (1 - (t - tinit) / (T - tfinal - tinit))^3
    b(t) = target_b                                                  t > T - tfinal

(truncated to an integer) and every triplet scoring at or below the (init_b - b(t))-th lowest
score is pruned: its Lambda_i is set to zero. At t = T - tfinal the final pattern is fixed
and re-applied after every later step. These are PEFT's semantics, step for step.
"""

from __future__ import annotations

import torch

from tilpass.methods.adalora.config import AdaLoraConfig
from tilpass.methods.adalora.layer import AdaLoraLinear


def budget_schedule(
    step: int, init_budget: int, target_budget: int, config: AdaLoraConfig, total_step: int
) -> tuple[int, bool]:
    """(budget, whether to mask at this step): the cubic schedule above, PEFT's rounding."""
    tinit, tfinal = config.tinit, config.tfinal
    if step <= tinit:
        return init_budget, False
    if step > total_step - tfinal:
        return target_budget, True
    progress = 1 - (step - tinit) / (total_step - tfinal - tinit)
    budget = int((init_budget - target_budget) * (progress**3) + target_budget)
    return budget, step % config.deltaT == 0


class RankAllocator:
    """Importance scores and budget masking for one adapter over its AdaLoRA layers.

    Args:
        layers: (module path, layer) of every layer holding the adapter, in path order.
        name: the adapter's name.
        config: its config; `rank_pattern` is written into it at every allocation.
    """

    def __init__(
        self, layers: list[tuple[str, AdaLoraLinear]], name: str, config: AdaLoraConfig
    ) -> None:
        self.layers, self.name, self.config = layers, name, config
        self.init_budget = sum(layer.specs[name].r for _, layer in layers)
        self.target_budget = config.target_r * len(layers)
        self.params = [p for _, layer in layers for p in layer.triplets(name)]
        self.exp_avg_ipt: list[torch.Tensor] = []
        self.exp_avg_unc: list[torch.Tensor] = []

    @property
    def total_step(self) -> int:
        if self.config.total_step is None:
            raise ValueError(
                "AdaLoRA needs total_step (the run's optimizer steps) before training: set it "
                "in the config (tilpass train fills it from the step plan)"
            )
        return self.config.total_step

    def reset_scores(self) -> None:
        """Forget the smoothed scores (PEFT does once the final pattern is fixed)."""
        self.exp_avg_ipt, self.exp_avg_unc = [], []

    @torch.no_grad()
    def update_scores(self) -> None:
        """One EMA step of sensitivity and uncertainty from the current gradients."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        params = [p.detach() for p in self.params]
        if not self.exp_avg_ipt:
            self.exp_avg_ipt = [torch.zeros_like(p) for p in params]
            self.exp_avg_unc = [torch.zeros_like(p) for p in params]
        b1, b2 = self.config.beta1, self.config.beta2
        ipt = torch._foreach_mul(params, grads)  # one fused kernel per group, not per tensor
        torch._foreach_abs_(ipt)
        avg, unc = self.exp_avg_ipt, self.exp_avg_unc
        torch._foreach_mul_(avg, b1)
        torch._foreach_add_(avg, torch._foreach_mul(ipt, 1 - b1))
        spread = torch._foreach_sub(ipt, avg)
        torch._foreach_abs_(spread)
        torch._foreach_mul_(unc, b2)
        torch._foreach_add_(unc, torch._foreach_mul(spread, 1 - b2))

    def triplet_scores(self) -> list[torch.Tensor]:
        """Each layer's (r,) triplet scores: s(Lambda_i) + mean_j s(P_ij) + mean_k s(Q_ki)."""
        out = []
        for index in range(len(self.layers)):
            s_p, s_e, s_q = (
                self.exp_avg_ipt[3 * index + k] * self.exp_avg_unc[3 * index + k] for k in range(3)
            )
            vectors = s_p.mean(dim=1) + s_q.mean(dim=0)  # (r,)
            out.append(s_e.view(-1) + vectors)
        return out

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        """Prune the lowest-scoring triplets down to `budget`; returns the new rank pattern."""
        scores = self.triplet_scores()
        pruned = self.init_budget - budget
        if pruned <= 0:  # nothing to prune (target_r == init_r)
            threshold = -float("inf")
        else:
            threshold = torch.kthvalue(torch.cat(scores), k=pruned)[0].item()
        return self.apply_masks([score > threshold for score in scores])

    @torch.no_grad()
    def apply_masks(self, keeps: list[torch.Tensor]) -> dict[str, list[bool]]:
        """Zero Lambda of the triplets `keeps` drops; record the masks and the rank pattern."""
        pattern = {}
        # One device-to-host copy for all layers, not one per layer.
        on_host = torch.cat([k.view(-1) for k in keeps]).to("cpu").split([k.numel() for k in keeps])
        for (path, layer), keep, host in zip(self.layers, keeps, on_host, strict=True):
            e = layer.lora_E[self.name]
            e.masked_fill_(~keep.to(e.device).view(-1, 1), 0.0)
            layer.rank_mask[self.name] = host
            pattern[f"{path}.lora_E"] = host.tolist()
        self.config.rank_pattern = pattern
        return pattern

    def mask_with_pattern(self) -> None:
        """Re-apply the fixed final pattern (after each step of the final phase). A run
        resumed from a checkpoint has no masks yet: the pruned triplets are the zero Lambdas."""
        keeps = []
        for _, layer in self.layers:
            keep = layer.rank_mask.get(self.name)
            keeps.append(layer.lora_E[self.name].view(-1) != 0 if keep is None else keep)
        self.apply_masks(keeps)

    def allocate(self, step: int) -> None:
        """The budget and masking of optimizer step `step` (0-based), as PEFT's
        `update_and_allocate(step)` does after its score update."""
        end = self.total_step - self.config.tfinal
        if step < end:
            budget, due = budget_schedule(
                step, self.init_budget, self.target_budget, self.config, self.total_step
            )
            if due:
                self.mask_to_budget(budget)
        elif step == end:
            self.mask_to_budget(self.target_budget)
            self.reset_scores()
        else:
            self.mask_with_pattern()

    def wants_scores(self, step: int) -> bool:
        """Whether step `step` updates the importance scores (every step before the end)."""
        return step < self.total_step - self.config.tfinal

    def kept_ranks(self) -> dict[str, int]:
        """{module path: kept triplets} as the layers hold them now."""
        return {path: layer.kept_rank(self.name) for path, layer in self.layers}
