"""`modules_to_save`: whole modules (a classifier head, say) trained and saved per adapter.

The original stays frozen as `original_module`; each adapter gets a trainable copy (PEFT's
layout and file keys). The forward runs the active adapter's copy, or the original when none
is active; a routed batch runs each copy on its own rows.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
from torch import nn

from tilpass.layers import AdapterLayer
from tilpass.routing import Plan, current_routing


@dataclasses.dataclass(frozen=True)
class TiedCopy:
    """The spec of a copy that shares its `weight` with another module's copy (a tied
    `lm_head` with the input embedding's, under `ensure_weight_tying`)."""

    source: nn.Module


class ModulesToSave(AdapterLayer):
    """Holds a frozen original module and one trainable full copy per adapter."""

    STORES = ("modules_to_save",)
    MERGEABLE = True  # "merging" keeps the active copy in place of the original (on unwrap)
    STATUS_TYPE = "ModulesToSaveWrapper"
    AUXILIARY = True

    def __init__(self, original: nn.Module) -> None:
        super().__init__(original, adopt=False)
        self.original_module = original
        self.modules_to_save = nn.ModuleDict()

    def create(self, name: str, spec: Any) -> None:
        """Copy the original module as adapter `name`'s trainable version; a `TiedCopy` spec
        makes the copy use the source's weight Parameter itself (one tensor, trained once)."""
        memo: dict[int, Any] = {}
        if isinstance(spec, TiedCopy):
            memo[id(self.original_module.weight)] = spec.source.weight
        clone = copy.deepcopy(self.original_module, memo)
        for p in clone.parameters():
            p.requires_grad_(True)
        self.modules_to_save[name] = clone

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """The copy's state, keyed as PEFT's files key it (the original's own names)."""
        if name not in self.modules_to_save:
            return {}
        return dict(self.modules_to_save[name].state_dict(keep_vars=True))

    def merge(self, names: list[str] | None = None) -> None:
        """Nothing to fold: unwrapping with `merge=True` puts the active copy in place."""

    def unwrap(self, merge: bool = False) -> nn.Module:
        """The module to put back: the active copy when merging, else the original."""
        return self.current() if merge else self.original_module

    def current(self) -> nn.Module:
        """The copy a plain (unrouted) forward runs."""
        if not self.disabled:
            for name in self.active:
                if name in self.modules_to_save:
                    return self.modules_to_save[name]
        return self.original_module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The active copy's forward; in a routed batch, each row's copy. The input may come
        positionally or by keyword (`head(hidden_states=h)`)."""
        routing = current_routing()
        key, x = routed_input(args, kwargs)
        if self.disabled or routing is None or x is None:
            return self.current()(*args, **kwargs)
        plan = routing.plan(self.rows(x), x.device)
        if plan.single is not None:
            name = self.name_of.get(plan.single)
            module = self.modules_to_save[name] if name is not None else self.original_module
            return module(*args, **kwargs)
        return self.mixed_forward(x, plan, *args, routed_key=key, **kwargs)

    def mixed_forward(  # type: ignore[override]
        self, x: torch.Tensor, plan: Plan, *args: Any, routed_key: int | str = 0, **kwargs: Any
    ) -> torch.Tensor:
        """Each distinct copy runs on its own rows (a full copy per adapter is rare: heads,
        so one call per adapter present is acceptable here). `routed_key` says where `x`
        sits among the arguments (a position or a keyword)."""
        out = self.original_module(*args, **kwargs)
        if not isinstance(out, torch.Tensor):
            # A tuple's parts need not share the batch axis (an RNN's h_n is batched on dim 1),
            # so rows cannot be spliced back generically; PEFT refuses the same way.
            raise TypeError(
                f"Mixed batching is only supported for the following modules: {MIXED_TYPES}. "
                f"The modules_to_save module {type(self.original_module).__name__} returns a "
                f"{type(out).__name__}, not one tensor, so its rows cannot be routed per "
                "adapter; run each adapter's rows in a batch of their own"
            )
        assert plan.token_ids is not None
        per_row = plan.token_ids.view(x.shape[0], -1)
        if not bool((per_row == per_row[:, :1]).all()):
            raise NotImplementedError(
                "modules_to_save modules route whole rows; per-token adapter ids that differ "
                "within a row are not supported for them"
            )
        rows = per_row[:, 0]  # (B,) each row's adapter id
        for name, adapter_id in self.ids.items():
            sel = (rows == adapter_id).nonzero().squeeze(1)
            if sel.numel():
                sub_args, sub_kwargs = with_input(args, kwargs, routed_key, x[sel])
                out = out.index_copy(0, sel, self.modules_to_save[name](*sub_args, **sub_kwargs))
        return out


MIXED_TYPES = "Linear, Embedding, Conv1d, Conv2d, Conv3d (and any module returning one tensor)"


def routed_input(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[int | str, torch.Tensor | None]:
    """Where the batch input is (the first tensor argument, positional or keyword), and it."""
    for i, value in enumerate(args):
        if isinstance(value, torch.Tensor):
            return i, value
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            return key, value
    return 0, None


def with_input(
    args: tuple[Any, ...], kwargs: dict[str, Any], key: int | str, value: torch.Tensor
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The call's arguments with the routed input at `key` replaced by `value`."""
    if isinstance(key, str):
        return args, {**kwargs, key: value}
    return (*args[:key], value, *args[key + 1 :]), kwargs
