"""The merging half of `AdaptedModel`'s API: fold adapters into the base weights, take them
out again, unload the wrappers, and combine adapters into a new one (PEFT's method names).

A mixin, so `model.py` keeps adapter management and this file keeps what changes base weights.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from torch import nn

from tilpass.inject import mark_shared_weights, unwrap_all
from tilpass.merging import add_weighted, merge_layer
from tilpass.saved_modules import ModulesToSave

if TYPE_CHECKING:
    from tilpass.model import AdaptedModel


class MergeMixin:
    """`merge_adapter`, `unmerge_adapter`, `merge_and_unload`, `unload`,
    `add_weighted_adapter` for `AdaptedModel`."""

    def merge_adapter(
        self: AdaptedModel, adapter_names: list[str] | None = None, safe_merge: bool = False
    ) -> None:
        """Fold adapters (default: the active ones) into the base weights; idempotent.

        With `safe_merge=True` each layer is merged on a copy first and a non-finite result
        raises `ValueError`, leaving that layer's weights as they were.
        """
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        for name in names:
            self.check_adapter_name(name)
        self.check_mergeable(names)
        holders = [  # a modules_to_save copy folds nothing in, so it is never "merged"
            layer
            for layer in self.adapter_layer_list()
            if any(n in layer.specs for n in names) and not isinstance(layer, ModulesToSave)
        ]
        if holders and all(set(names) & set(h.specs) <= set(h.merged) for h in holders):
            warnings.warn("All adapters are already merged, nothing to do.", stacklevel=2)
            return
        mark_shared_weights(self.base_model)  # a tied weight is merged on a private copy
        for layer in self.adapter_layer_list():
            if layer.MERGEABLE:
                merge_layer(layer, list(names), safe_merge)

    def check_mergeable(self: AdaptedModel, names: list[str]) -> None:
        for layer in self.adapter_layer_list():
            if not layer.MERGEABLE and any(n in layer.specs for n in names):
                raise NotImplementedError(
                    f"{type(layer).__name__} adapters cannot be merged into the weights; keep "
                    "them loaded, or unload them"
                )

    def unmerge_adapter(self: AdaptedModel) -> None:
        """Take every merged adapter back out of the base weights."""
        for layer in self.adapter_layer_list():
            layer.unmerge()

    def merge_and_unload(
        self: AdaptedModel,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ) -> nn.Module:
        """Merge adapters (default: the active ones) and return the plain base model, with no
        wrappers left. `safe_merge` checks each merged weight for NaN / inf first."""
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        for name in names:
            self.check_adapter_name(name)
        self.check_mergeable(names)
        for layer in self.adapter_layer_list():
            if layer.STAYS_WHEN_MERGED and any(n in layer.specs for n in names):
                raise NotImplementedError(
                    f"{type(layer).__name__} adapters stay outside the weights when merged, so "
                    "the model cannot be unloaded with them; call merge_adapter() instead (it "
                    "merges what can be merged and keeps the rest), or unload()"
                )
        for layer in self.adapter_layer_list():
            layer.unmerge()  # so only the chosen adapters end up in the weights
            layer.active = [n for n in names if n in layer.specs]
        if safe_merge:
            self.merge_adapter(names, safe_merge=True)
        self.refresh_layers()
        return unwrap_all(self.base_model, merge=True)

    def unload(self: AdaptedModel) -> nn.Module:
        """Return the base model as it was: adapters removed, nothing merged."""
        self.refresh_layers()
        return unwrap_all(self.base_model, merge=False)

    def add_weighted_adapter(
        self: AdaptedModel,
        adapters: list[str],
        weights: list[float],
        adapter_name: str,
        combination_type: str = "svd",
        svd_rank: int | None = None,
        svd_clamp: float | None = None,
        svd_full_matrices: bool = True,
        svd_driver: str | None = None,
        density: float | None = None,
        majority_sign_method: str = "total",
    ) -> None:
        """Add `adapter_name` as a weighted combination of `adapters` (PEFT's method and
        combination types: `svd`, `linear`, `cat`, `ties`, `dare_linear`, `dare_ties`,
        `magnitude_prune` and their `_svd` forms; `density` and `majority_sign_method` as in
        PEFT). The new adapter is inactive and frozen."""
        svd = {
            "svd_rank": svd_rank,
            "svd_clamp": svd_clamp,
            "svd_full_matrices": svd_full_matrices,
            "svd_driver": svd_driver,
        }
        if adapters:
            self.check_adapter_name(adapters[0])
        add_weighted(
            self,
            adapters,
            weights,
            adapter_name,
            combination_type,
            svd,
            density,
            majority_sign_method,
        )
