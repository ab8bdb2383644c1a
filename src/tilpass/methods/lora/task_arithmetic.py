"""Task-arithmetic merges of same-shaped tensors: TIES, DARE and magnitude pruning.

Each combination takes n tensors t_i of one shape and weights w_i and returns one tensor:

- `linear`: sum_i w_i t_i;
- `magnitude_prune`: sum_i w_i P(t_i), P keeping the round(density * numel) largest |t|;
- `ties` (trim, elect sign, disjoint merge): the trimmed tensors P(t_i) elect a sign per entry
  (`total`: the sign of sum_i P(t_i); `frequency`: the sign held by more of them; ties count
  as +), then each entry is the mean of w_i P(t_i) over the tensors whose sign agrees;
- `dare_linear`: sum_i w_i D(t_i), D keeping each entry with probability `density` and
  dividing the kept ones by `density` (so E[D(t)] = t);
- `dare_ties`: TIES with D in place of P.

The semantics are PEFT's (`peft.utils.merge_utils`), so results agree with PEFT. DARE's masks
come from torch's global generator, one `torch.bernoulli` draw per tensor in the order the
tensors are given: under the same `torch.manual_seed` and call order the masks are PEFT's.
"""

from __future__ import annotations

import warnings

import torch

SIGN_METHODS = ("total", "frequency")
PRUNING = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
"""The combinations that need `density`."""


def check_density(combination: str, density: float | None, sign_method: str) -> None:
    """Refuse a missing or negative `density`, or an unknown majority-sign method, up front."""
    base = combination.removesuffix("_svd")
    if base in PRUNING and density is None:
        raise ValueError(
            f"combination_type {combination!r} needs density: the fraction of each adapter's "
            "entries to keep, between 0 and 1 (e.g. density=0.5)"
        )
    if density is not None and density < 0:
        raise ValueError(f"density must be between 0 and 1, got {density}")
    if sign_method not in SIGN_METHODS:
        raise ValueError(
            f"majority_sign_method must be one of {', '.join(SIGN_METHODS)}, got {sign_method!r}"
        )


def keep_largest(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """`tensor` with all but its int(density * numel) largest-magnitude entries set to zero."""
    flat = tensor.reshape(-1)
    keep = torch.zeros_like(flat)
    keep[flat.abs().topk(int(density * flat.numel())).indices] = 1
    return tensor * keep.view_as(tensor)


def keep_random(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """DARE's drop and rescale: each entry kept with probability `density`, then / density."""
    return tensor * torch.bernoulli(torch.full_like(tensor, density)) / density


def _prune(tensor: torch.Tensor, density: float, random: bool) -> torch.Tensor:
    if density >= 1:
        warnings.warn(f"density {density} >= 1 keeps every entry; nothing is pruned", stacklevel=4)
        return tensor
    return keep_random(tensor, density) if random else keep_largest(tensor, density)


def elected_sign_mask(stacked: torch.Tensor, method: str) -> torch.Tensor:
    """Per entry, whether each tensor (dim 0) carries the elected sign (`total` or `frequency`)."""
    signs = stacked.sign()
    votes = stacked.sum(dim=0) if method == "total" else signs.sum(dim=0)
    elected = torch.where(votes >= 0, 1, -1)
    return signs == elected


def disjoint_mean(weighted: torch.Tensor, agree: torch.Tensor) -> torch.Tensor:
    """The mean over dim 0 of the entries that agree (zero where none do)."""
    total = (weighted * agree).sum(dim=0)
    return total / agree.sum(dim=0).clamp(min=1.0)


def combine(
    combination: str,
    tensors: list[torch.Tensor],
    weights: torch.Tensor,
    density: float | None = None,
    sign_method: str = "total",
) -> torch.Tensor:
    """Merge same-shaped `tensors` with `weights` (a 1-D tensor) by `combination` (see above)."""
    if combination != "linear":
        assert density is not None  # checked by check_density
        random = combination.startswith("dare")
        tensors = [_prune(t, density, random) for t in tensors]
    stacked = torch.stack(tensors, dim=0)  # (n, *shape)
    weighted = stacked * weights.view(-1, *([1] * (stacked.dim() - 1)))
    if combination in ("ties", "dare_ties"):
        return disjoint_mean(weighted, elected_sign_mask(stacked, sign_method))
    return weighted.sum(dim=0)
