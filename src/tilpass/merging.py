"""Merging: one adapter layer, optionally checked (a merge that would leave NaN or inf in the
weights is undone and reported instead, PEFT's `safe_merge`), and new adapters made as weighted
combinations of others (`add_weighted_adapter`, done by the adapters' method)."""

from __future__ import annotations

from typing import Any

import torch

from tilpass.layers import AdapterLayer
from tilpass.methods import method_of


def merge_layer(layer: AdapterLayer, names: list[str], safe: bool) -> None:
    """Merge `names` into `layer`; with `safe`, restore the layer and raise on NaN / inf."""
    if not safe:
        layer.merge(names)
        return
    saved = {t: getattr(layer, t).detach().clone() for t in layer.merge_targets()}
    layer.merge(names)
    bad = [t for t in saved if not bool(torch.isfinite(getattr(layer, t)).all())]
    if bad:
        layer.unmerge()
        with torch.no_grad():
            for target, value in saved.items():
                getattr(layer, target).data.copy_(value)
        raise ValueError(
            f"NaNs detected in the merged weights. The adapter {names} seems to be broken "
            f"({type(layer).__name__}.{', '.join(bad)} would not be finite); nothing was merged "
            "into this layer."
        )


def add_weighted(
    model: Any,
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    combination_type: str,
    svd: dict[str, Any],
    density: float | None = None,
    majority_sign_method: str = "total",
) -> None:
    """`AdaptedModel.add_weighted_adapter`: hand the combination to the adapters' method.

    `svd` holds PEFT's `svd_*` settings; `density` and `majority_sign_method` (for `ties`,
    `dare_*` and `magnitude_prune*`) travel in the same settings dict, unless it names them.
    """
    if not adapters:
        raise ValueError("add_weighted_adapter needs at least one adapter to combine")
    method = method_of(model.peft_config[adapters[0]])
    if method.add_weighted is None:
        raise NotImplementedError(
            f"{method.name} adapters cannot be combined with add_weighted_adapter"
        )
    settings = {"density": density, "majority_sign_method": majority_sign_method, **svd}
    method.add_weighted(model, adapters, weights, adapter_name, combination_type, settings)
