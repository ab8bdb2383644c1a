"""`add_weighted_adapter` for LoRA: a new adapter made from a weighted combination of others.

PEFT's semantics and combination types (the new adapter has r = its rank, lora_alpha = r,
the union of the target modules, no rank / alpha patterns, and starts frozen and inactive):

- `linear`: A = sum_i sign(w_i s_i) sqrt(|w_i s_i|) A_i, B = sum_i sqrt(|w_i s_i|) B_i (all
  ranks equal; a rough approximation of sum_i w_i s_i B_i A_i);
- `cat`: A = [w_1 s_1 A_1; w_2 s_2 A_2; ...], B = [B_1, B_2, ...] (rank = the sum of the ranks;
  exactly sum_i w_i s_i B_i A_i);
- `svd`: the truncated SVD of sum_i w_i s_i B_i A_i at rank `svd_rank` (default: the largest
  rank): B = U_r diag(S_r), A = V_r^T, optionally clamped at the `svd_clamp` quantile;
- `ties`, `dare_linear`, `dare_ties`, `magnitude_prune`: as `linear` (same weights on A and B,
  same ranks), with the A's and the B's each merged by that task-arithmetic rule
  (`task_arithmetic.py`; `density`, `majority_sign_method`);
- `ties_svd`, `dare_linear_svd`, `dare_ties_svd`, `magnitude_prune_svd`: the rule applied to
  the full deltas w_i s_i B_i A_i, then truncated by SVD as in `svd`.

DARE draws its random masks from torch's global generator layer by layer in module order (per
layer: every adapter's A, then every adapter's B; for the `_svd` kinds one mask per adapter's
delta), as PEFT does: the same `torch.manual_seed` gives PEFT's masks.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import torch

from tilpass.methods.lora.embedding import LoraEmbedding
from tilpass.methods.lora.layers import LoraLayer
from tilpass.methods.lora.task_arithmetic import check_density, combine

FACTOR_WISE = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
"""Combinations applied to the A's and the B's separately (all ranks equal)."""
DELTA_WISE = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
"""Combinations applied to the full deltas, then truncated by SVD."""
SUPPORTED = (*FACTOR_WISE, "cat", *DELTA_WISE)


@dataclasses.dataclass(frozen=True)
class SvdSettings:
    """How the `svd` combination truncates (PEFT's `svd_*` arguments)."""

    rank: int
    clamp: float | None = None
    full_matrices: bool = True
    driver: str | None = None


@dataclasses.dataclass(frozen=True)
class Combination:
    """One `add_weighted_adapter` call's rule: the kind, its pruning settings and its SVD."""

    kind: str
    svd: SvdSettings
    density: float | None = None
    sign_method: str = "total"


def _new_rank(configs: list[Any], combination_type: str, svd_rank: int | None) -> int:
    ranks = [max(c.r, *c.rank_pattern.values()) if c.rank_pattern else c.r for c in configs]
    if combination_type in FACTOR_WISE:
        if len(set(ranks)) != 1:
            raise ValueError(
                "All adapters must have the same r value when using combination_type "
                f"{combination_type} (ranks: {ranks}); use 'cat' or 'svd' for adapters of "
                "different ranks."
            )
        return ranks[0]
    return sum(ranks) if combination_type == "cat" else svd_rank or max(ranks)


def _union_targets(configs: list[Any]) -> list[str] | str:
    targets = [c.target_modules for c in configs]
    kinds = {type(t) for t in targets}
    if len(kinds) > 1:
        raise ValueError(
            "all adapter configs should follow the same target modules type. Combining adapters "
            "with `target_modules` type being a mix of list/set and string is not supported."
        )
    if isinstance(targets[0], str):
        return "|".join(f"({t})" for t in targets)
    return sorted(set().union(*targets))


def _check(model: Any, adapters: list[str], weights: list[float], combination_type: str) -> None:
    for name in adapters:
        if name not in model.peft_config:
            raise ValueError(f"Adapter {name} does not exist")
    if len(weights) != len(adapters):
        raise ValueError(f"got {len(weights)} weights for {len(adapters)} adapters; pass one each")
    if combination_type not in SUPPORTED:
        raise NotImplementedError(
            f"combination_type {combination_type!r} is not supported by tilpass; supported are "
            f"{', '.join(SUPPORTED)}"
        )
    saved: dict[str, int] = {}
    for name in adapters:
        for module in model.peft_config[name].modules_to_save or []:
            saved[module] = saved.get(module, 0) + 1
    if any(count > 1 for count in saved.values()):
        raise ValueError(
            "Cannot add weighted adapters if they target the same module with modules_to_save."
        )


def add_weighted_adapter(
    model: Any,
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd: dict[str, Any] | None = None,
) -> None:
    """Add `adapter_name` to `model` (an `AdaptedModel`) as a weighted combination of
    `adapters`; `svd` holds PEFT's `svd_rank`, `svd_clamp`, `svd_full_matrices`, `svd_driver`
    and, for the pruning kinds, `density` and `majority_sign_method`."""
    if adapter_name in model.peft_config:
        warnings.warn(
            f"an adapter named {adapter_name!r} exists already; add_weighted_adapter left it "
            "unchanged (as PEFT does). Delete it first to combine anew.",
            stacklevel=3,
        )
        return
    svd = svd or {}
    combination_type = "linear" if len(adapters) == 1 else combination_type
    _check(model, adapters, weights, combination_type)
    sign_method = svd.get("majority_sign_method") or "total"
    check_density(combination_type, svd.get("density"), sign_method)
    configs = [model.peft_config[a] for a in adapters]
    rank = _new_rank(configs, combination_type, svd.get("svd_rank"))
    config = dataclasses.replace(
        configs[0],
        r=rank,
        lora_alpha=rank,
        target_modules=_union_targets(configs),
        alpha_pattern={},
        rank_pattern={},
    )
    model.add_adapter(adapter_name, config)
    settings = SvdSettings(
        rank,
        svd.get("svd_clamp"),
        svd.get("svd_full_matrices", True),
        svd.get("svd_driver"),
    )
    rule = Combination(combination_type, settings, svd.get("density"), sign_method)
    try:
        for layer in model.adapter_layer_list():
            if isinstance(layer, LoraLayer) and adapter_name in layer.specs:
                _combine(layer, adapters, weights, adapter_name, rule)
    except Exception:
        model.delete_adapter(adapter_name)
        raise
    model.set_requires_grad(adapter_name, False)


@torch.no_grad()
def _combine(
    layer: LoraLayer, adapters: list[str], weights: list[float], new: str, rule: Combination
) -> None:
    """Fill the new adapter's A and B in one layer from the adapters this layer holds."""
    present = [(a, w) for a, w in zip(adapters, weights, strict=True) if a in layer.specs]
    a_new, b_new = layer.lora_a[new], layer.lora_b[new]
    a_new.zero_()
    b_new.zero_()
    if not present:
        return
    if rule.kind == "cat":
        parts = [(layer.lora_a[a], layer.lora_b[a], w * layer.specs[a].scale) for a, w in present]
        a = torch.cat([pa * ws for pa, _, ws in parts], dim=0)  # (sum r, in)
        b = torch.cat([pb for _, pb, _ in parts], dim=1)  # (out, sum r)
        a_new[: a.shape[0]].copy_(a)
        b_new[:, : b.shape[1]].copy_(b)
    elif rule.kind in FACTOR_WISE:
        a, b = _factor_wise(layer, present, rule)
        if a.shape != a_new.shape:
            raise ValueError(
                f"combination_type {rule.kind!r} needs the same rank in every layer; use 'cat' "
                "or 'svd' for adapters with rank_pattern"
            )
        a_new.copy_(a)
        b_new.copy_(b)
    else:
        a, b = _delta_wise(layer, present, rule)
        a_new.copy_(a.reshape(a_new.shape))
        b_new.copy_(b.reshape(b_new.shape))
    layer.invalidate()


def _factor_wise(
    layer: LoraLayer, present: list[tuple[str, float]], rule: Combination
) -> tuple[torch.Tensor, torch.Tensor]:
    """A = rule(sign(w s) sqrt|w s| A_i), B = rule(sqrt|w s| B_i): the A's, then the B's."""
    scaled = [w * layer.specs[a].scale for a, w in present]
    a_weights = torch.tensor([math.copysign(math.sqrt(abs(ws)), ws) for ws in scaled])
    b_weights = torch.tensor([math.sqrt(abs(ws)) for ws in scaled])
    a_list = [layer.lora_a[a] for a, _ in present]
    b_list = [layer.lora_b[a] for a, _ in present]
    a = combine(rule.kind, a_list, a_weights.to(a_list[0].device), rule.density, rule.sign_method)
    b = combine(rule.kind, b_list, b_weights.to(b_list[0].device), rule.density, rule.sign_method)
    return a, b


def _delta_wise(
    layer: LoraLayer, present: list[tuple[str, float]], rule: Combination
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B): the SVD of the rule applied to the adapters' deltas (each s_i B_i A_i)."""
    deltas = [_delta_as_ba(layer, a) for a, _ in present]  # each (out, in)
    weights = torch.tensor([w for _, w in present]).to(deltas[0].device)
    kind = rule.kind.removesuffix("_svd")
    delta = combine(
        "linear" if kind == "svd" else kind, deltas, weights, rule.density, rule.sign_method
    )
    return _svd(delta, rule.svd)


def _delta_as_ba(layer: LoraLayer, name: str) -> torch.Tensor:
    """s B A as a matrix shaped (B's rows, A's columns): the layer's delta in weight layout,
    flattened (convolutions) or transposed back (embeddings, fan-in-fan-out weights)."""
    if getattr(layer, "groups", 1) > 1:  # its delta_weight is DoRA's norm term, no update
        raise NotImplementedError(
            f"combinations through the SVD need each adapter's weight update, which a "
            f"convolution with groups={layer.groups} does not have; use combination_type "
            "'linear' or 'cat', or leave this layer out"
        )
    delta = layer.delta_weight(name)
    if delta.dim() > 2:
        return delta.flatten(start_dim=1)
    if isinstance(layer, LoraEmbedding) or getattr(layer, "transposed", False):
        return delta.T
    return delta


def _svd(delta: torch.Tensor, svd: SvdSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of rank `svd.rank` with B A the best approximation of `delta` (out, in)."""
    kwargs = {"driver": svd.driver} if svd.driver is not None else {}
    u, s, vh = torch.linalg.svd(delta, full_matrices=svd.full_matrices, **kwargs)
    u = u[:, : svd.rank] @ torch.diag(s[: svd.rank])  # (out, r)
    vh = vh[: svd.rank, :]  # (r, in)
    if svd.clamp is not None:
        high = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), svd.clamp)
        u, vh = u.clamp(-high, high), vh.clamp(-high, high)
    return vh, u
