"""`add_weighted_adapter` for LoRA: a new adapter made from a weighted combination of others.

PEFT's semantics and combination types (the new adapter has r = its rank, lora_alpha = r,
the union of the target modules, no rank / alpha patterns, and starts frozen and inactive):

- `linear`: A = sum_i sign(w_i s_i) sqrt(|w_i s_i|) A_i, B = sum_i sqrt(|w_i s_i|) B_i (all
  ranks equal; a rough approximation of sum_i w_i s_i B_i A_i);
- `cat`: A = [w_1 s_1 A_1; w_2 s_2 A_2; ...], B = [B_1, B_2, ...] (rank = the sum of the ranks;
  exactly sum_i w_i s_i B_i A_i);
- `svd`: the truncated SVD of sum_i w_i s_i B_i A_i at rank `svd_rank` (default: the largest
  rank): B = U_r diag(S_r), A = V_r^T, optionally clamped at the `svd_clamp` quantile.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import torch

from tilpass.methods.lora.layers import LoraLayer

SUPPORTED = ("linear", "cat", "svd")


@dataclasses.dataclass(frozen=True)
class SvdSettings:
    """How the `svd` combination truncates (PEFT's `svd_*` arguments)."""

    rank: int
    clamp: float | None = None
    full_matrices: bool = True
    driver: str | None = None


def _new_rank(configs: list[Any], combination_type: str, svd_rank: int | None) -> int:
    ranks = [max(c.r, *c.rank_pattern.values()) if c.rank_pattern else c.r for c in configs]
    if combination_type == "linear":
        if len(set(ranks)) != 1:
            raise ValueError(
                "All adapters must have the same r value when using combination_type linear "
                f"(ranks: {ranks}); use 'cat' or 'svd' for adapters of different ranks."
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
    `adapters`; `svd` holds PEFT's `svd_rank`, `svd_clamp`, `svd_full_matrices`, `svd_driver`."""
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
    try:
        for layer in model.adapter_layer_list():
            if isinstance(layer, LoraLayer) and adapter_name in layer.specs:
                _combine(layer, adapters, weights, adapter_name, combination_type, settings)
    except Exception:
        model.delete_adapter(adapter_name)
        raise
    model.set_requires_grad(adapter_name, False)


@torch.no_grad()
def _combine(
    layer: LoraLayer,
    adapters: list[str],
    weights: list[float],
    new: str,
    combination_type: str,
    svd: SvdSettings,
) -> None:
    """Fill the new adapter's A and B in one layer from the adapters this layer holds."""
    present = [(a, w) for a, w in zip(adapters, weights, strict=True) if a in layer.specs]
    a_new, b_new = layer.lora_a[new], layer.lora_b[new]
    a_new.zero_()
    b_new.zero_()
    if not present:
        return
    parts = [
        (layer.lora_a[a].float(), layer.lora_b[a].float(), w * layer.specs[a].scale)
        for a, w in present
    ]
    if combination_type == "cat":
        a = torch.cat([pa * ws for pa, _, ws in parts], dim=0)  # (sum r, in)
        b = torch.cat([pb for _, pb, _ in parts], dim=1)  # (out, sum r)
        a_new[: a.shape[0]].copy_(a)
        b_new[:, : b.shape[1]].copy_(b)
    elif combination_type == "linear":
        if any(pa.shape != a_new.shape for pa, _, _ in parts):
            raise ValueError(
                "combination_type 'linear' needs the same rank in every layer; use 'cat' or "
                "'svd' for adapters with rank_pattern"
            )
        a_new.copy_(sum(math.copysign(math.sqrt(abs(ws)), ws) * pa for pa, _, ws in parts))
        b_new.copy_(sum(math.sqrt(abs(ws)) * pb for _, pb, ws in parts))
    else:
        a, b = _svd(sum(ws * (pb @ pa) for pa, pb, ws in parts), svd)  # delta: (out, in)
        a_new.copy_(a)
        b_new.copy_(b)
    layer.invalidate()


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
