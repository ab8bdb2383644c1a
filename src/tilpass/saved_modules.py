"""`modules_to_save`: whole modules (a classifier head, say) trained and saved per adapter.

The original stays frozen as `original_module`; each adapter gets a trainable copy. The
forward runs the active adapter's copy, or the original when none is active.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from tilpass.routing import Router


class ModulesToSave(nn.Module):
    """Holds a frozen original module and one trainable full copy per adapter."""

    def __init__(self, original: nn.Module, router: Router | None) -> None:
        super().__init__()
        self.original_module = original
        self.modules_to_save = nn.ModuleDict()
        self.router = router
        self.active: list[str] = []
        self.disabled = False

    def add(self, name: str) -> None:
        """Copy the original module as adapter `name`'s trainable version."""
        clone = copy.deepcopy(self.original_module)
        for p in clone.parameters():
            p.requires_grad_(True)
        self.modules_to_save[name] = clone

    def delete(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        self.active = [a for a in self.active if a != name]

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """The copy's state, keyed as PEFT's files key it (the original's own names)."""
        if name not in self.modules_to_save:
            return {}
        return dict(self.modules_to_save[name].state_dict(keep_vars=True))

    @torch.no_grad()
    def load_adapter_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        targets = self.adapter_tensors(name)
        for key, value in tensors.items():
            targets[key].copy_(value)

    def _current(self) -> nn.Module:
        if self.disabled:
            return self.original_module
        for name in self.active:
            if name in self.modules_to_save:
                return self.modules_to_save[name]
        return self.original_module

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        router = self.router
        if self.disabled or router is None or router.row_ids is None:
            return self._current()(x, *args, **kwargs)
        # Mixed batch: each distinct copy runs on its own rows. A full module copy per adapter
        # is rare (heads), so one call per adapter present is acceptable here.
        rows = router.row_ids.to(x.device)
        out = self.original_module(x, *args, **kwargs)
        for gid in torch.unique(rows).tolist():
            name = router.names[gid] if gid >= 0 else None
            if name is None or name not in self.modules_to_save:
                continue
            sel = (rows == gid).nonzero().squeeze(1)
            out = out.index_copy(0, sel, self.modules_to_save[name](x[sel], *args, **kwargs))
        return out

    def unwrap(self, merge: bool) -> nn.Module:
        """The module to put back: the active copy when merging, else the original."""
        return self._current() if merge else self.original_module
