"""Merging one adapter layer, optionally checked: a merge that would leave NaN or inf in the
weights is undone and reported instead (PEFT's `safe_merge`)."""

from __future__ import annotations

import torch

from tilpass.layers import AdapterLayer


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
