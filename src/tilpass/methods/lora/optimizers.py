"""PEFT's LoRA optimizers: LoRA+ learning-rate groups and the LoRA-FA optimizer.

LoRA+ (https://arxiv.org/abs/2402.12354) trains B faster than A: `create_loraplus_optimizer`
puts A factors at `lr`, B factors (and 1-d trainable tensors) at `lr * loraplus_lr_ratio`, and
an embedding's factors at `loraplus_lr_embedding`, in PEFT's four groups and order.

LoRA-FA (https://arxiv.org/abs/2308.03303) freezes A and trains B with AdamW on a projected
gradient. For an update s B A, the B gradient that best reproduces the full-weight gradient
g_W (in Frobenius norm, A fixed) is

    g~_B = (1 / s^2) g_B (A A^T + delta I)^+          g_B = s g_W A^T,  delta = 1e-8

which `LoraFAOptimizer` feeds to AdamW in place of g_B. Every other trainable tensor gets plain
AdamW (Hugging Face's variant: bias-corrected step, decoupled weight decay p <- p (1 - lr wd)
after the step). Parameters are found by layer type: a LoRA layer's A and B factors, not
names that contain "lora".
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from tilpass.inject import adapter_layers
from tilpass.methods.lora.embedding import LoraEmbedding
from tilpass.methods.lora.layers import LoraLayer

PROJECTION_DELTA = 1e-8


@dataclasses.dataclass
class Factors:
    """The LoRA factors of a model, by parameter id: each B's A, the embedding layers'
    factors, and each adapter tensor's scale s."""

    a_of_b: dict[int, nn.Parameter] = dataclasses.field(default_factory=dict)
    a_ids: set[int] = dataclasses.field(default_factory=set)
    embedding: set[int] = dataclasses.field(default_factory=set)
    scales: dict[int, float] = dataclasses.field(default_factory=dict)


def lora_factors(model: nn.Module) -> Factors:
    """The LoRA factors of every LoRA layer in `model` (found by layer type)."""
    found = Factors()
    for _, layer in adapter_layers(model):
        if not isinstance(layer, LoraLayer):
            continue
        for name, spec in layer.specs.items():
            a, b = layer.lora_a[name], layer.lora_b[name]
            found.a_of_b[id(b)] = a
            found.a_ids.add(id(a))
            if isinstance(layer, LoraEmbedding):
                found.embedding.update((id(a), id(b)))
            for p in layer.adapter_parameters(name):
                found.scales[id(p)] = spec.scale
    return found


def _no_decay(model: nn.Module) -> set[int]:
    """Biases and layer-norm parameters (Hugging Face's rule for weight decay)."""
    out: set[int] = set()
    for module in model.modules():
        for attr, p in module.named_parameters(recurse=False):
            if isinstance(module, nn.LayerNorm) or attr == "bias":
                out.add(id(p))
        if isinstance(module, LoraLayer) and hasattr(module, "lora_B_bias"):
            out.update(id(p) for p in module.lora_B_bias.values())
    return out


def create_loraplus_optimizer(
    model: nn.Module,
    optimizer_cls: type[Optimizer],
    *,
    lr: float,
    loraplus_lr_ratio: float,
    **kwargs: Any,
) -> Optimizer:
    """An `optimizer_cls` over `model`'s trainable parameters in LoRA+'s groups: A at `lr`,
    embedding factors at `loraplus_lr_embedding` (default 1e-6), B and 1-d tensors at
    `lr * loraplus_lr_ratio` (with `loraplus_weight_decay`, none for biases and norms)."""
    factors = lora_factors(model)
    no_decay = _no_decay(model)
    groups: dict[str, list[nn.Parameter]] = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if id(p) in factors.embedding:
            groups["embedding"].append(p)
        elif id(p) in factors.a_of_b or (id(p) not in factors.a_ids and p.ndim == 1):
            groups["B_no_decay" if id(p) in no_decay else "B"].append(p)
        else:
            groups["A"].append(p)
    decay = kwargs.pop("loraplus_weight_decay", 0.0)
    lr_embedding = kwargs.pop("loraplus_lr_embedding", 1e-6)
    param_groups = [
        {"params": groups["A"], "weight_decay": decay, "lr": lr},
        {"params": groups["embedding"], "weight_decay": decay, "lr": lr_embedding},
        {"params": groups["B"], "weight_decay": decay, "lr": lr * loraplus_lr_ratio},
        {"params": groups["B_no_decay"], "weight_decay": 0.0, "lr": lr * loraplus_lr_ratio},
    ]
    return optimizer_cls(param_groups, lr=lr, **kwargs)


class LoraFAOptimizer(Optimizer):
    """AdamW whose LoRA B factors step on LoRA-FA's projected gradient (module docstring).

    Each param group lists `params` with, per parameter, `names`, `scaling_factors` (s for
    a LoRA factor, else None) and `lora_A_index` (for a B factor, the index of its A in
    `params`, else None), as `create_lorafa_optimizer` builds them.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
    ) -> None:
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr} - should be >= 0.0")
        for beta in betas:
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"Invalid beta parameter: {beta} - should be in [0.0, 1.0)")
        if eps < 0.0:
            raise ValueError(f"Invalid epsilon value: {eps} - should be >= 0.0")
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "correct_bias": correct_bias,
        }
        super().__init__(params, defaults)
        for group in self.param_groups:
            if "lora_A_index" not in group:
                raise ValueError(
                    "LoraFAOptimizer needs each param group's `lora_A_index` (for each "
                    "parameter, the index of its A factor in `params` if it is a LoRA B factor, "
                    "else None), or every parameter would get plain AdamW; build the optimizer "
                    "with create_lorafa_optimizer(model, r, lora_alpha, lr)"
                )

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One AdamW step, with B factors on their projected gradient."""
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            params = group["params"]
            scales = group.get("scaling_factors", [None] * len(params))
            partners = group["lora_A_index"]
            for p, scale, index in zip(params, scales, partners, strict=True):
                if p.grad is None:
                    continue
                grad = p.grad if index is None else projected_gradient(p.grad, params[index], scale)
                self._adamw(p, grad, group)
        return loss

    def _adamw(self, p: torch.Tensor, grad: torch.Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        state["exp_avg"].mul_(beta1).add_(grad, alpha=1.0 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        denom = state["exp_avg_sq"].sqrt().add_(group["eps"])
        step_size = group["lr"]
        if group["correct_bias"]:
            step_size *= math.sqrt(1.0 - beta2 ** state["step"]) / (1.0 - beta1 ** state["step"])
        p.addcdiv_(state["exp_avg"], denom, value=-step_size)
        if group["weight_decay"] > 0.0:  # decoupled, after the step
            p.mul_(1.0 - group["lr"] * group["weight_decay"])


def projected_gradient(grad_b: torch.Tensor, a: torch.Tensor, scale: float) -> torch.Tensor:
    """(1 / s^2) g_B (A A^T + delta I)^+ in float32 at least, shaped like g_B; A may carry a
    kernel (a convolution's (r, in, *k)) and B a 1 x 1 one."""
    dtype = torch.promote_types(grad_b.dtype, torch.float32)
    a2d = a.detach().reshape(a.shape[0], -1).to(dtype)  # (r, in)
    rank = a2d.shape[0]
    gram = a2d @ a2d.T + PROJECTION_DELTA * torch.eye(rank, device=a.device, dtype=dtype)
    g2d = grad_b.reshape(grad_b.shape[0], rank).to(dtype)  # (out, r)
    projected = (g2d @ torch.linalg.pinv(gram)) / scale**2
    return projected.reshape(grad_b.shape).to(grad_b.dtype)


def create_lorafa_optimizer(
    model: nn.Module,
    r: int,
    lora_alpha: float,
    lr: float,
    weight_decay: float = 0.0,
    use_rslora: bool | None = None,
) -> LoraFAOptimizer:
    """Freeze every LoRA A factor and return a `LoraFAOptimizer` over `model`'s parameters
    (PEFT's function). Each layer's own scale is used (rank / alpha patterns included); `r`,
    `lora_alpha` give the group's `scaling_factor`, and `use_rslora` (deprecated in PEFT)
    must agree with the active adapters' configs."""
    configs = getattr(model, "peft_config", {})
    active = [n for n in getattr(model, "active_adapters", []) if n in configs]
    rslora = {n: bool(getattr(configs[n], "use_rslora", False)) for n in active}
    if use_rslora is not None:
        mismatched = [n for n, value in rslora.items() if value != use_rslora]
        if mismatched:
            raise ValueError(
                f"`use_rslora={use_rslora}` was passed to create_lorafa_optimizer, but the "
                f"following active adapters have `use_rslora` set differently in the model "
                f"config: {mismatched}. Configure rsLoRA in LoraConfig and leave out the "
                "`use_rslora` argument (it is deprecated)."
            )
        warnings.warn(
            "`use_rslora` in create_lorafa_optimizer is deprecated; configure rsLoRA in "
            "LoraConfig instead.",
            FutureWarning,
            stacklevel=2,
        )
    model_rslora = use_rslora if use_rslora is not None else bool(rslora) and all(rslora.values())
    factors = lora_factors(model)
    for p in model.parameters():
        if id(p) in factors.a_ids:
            p.requires_grad_(False)
    named = list(model.named_parameters())
    index = {id(p): i for i, (_, p) in enumerate(named)}
    partner = {b: index.get(id(a)) for b, a in factors.a_of_b.items()}
    group = {
        "params": [p for _, p in named],
        "names": [n for n, _ in named],
        "scaling_factors": [factors.scales.get(id(p)) for _, p in named],
        "lora_A_index": [partner.get(id(p)) for _, p in named],
        "scaling_factor": lora_alpha / (math.sqrt(r) if model_rslora else r),
        "lr": lr,
        "betas": (0.9, 0.999),
        "weight_decay": weight_decay,
    }
    return LoraFAOptimizer([group])
