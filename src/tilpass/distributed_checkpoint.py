"""Checkpoints of sharded (FSDP2) runs: whole tensors on disk, shards in memory.

A checkpoint does not depend on how the run that wrote it was laid out: under ``--shard``
the adapter's parameters and AdamW states are gathered whole before rank 0 writes them
(:func:`gather_state`), so the files are those a single process writes; on resume each
rank cuts its own shards out of the whole tensors it read (:func:`place_like`). A run
therefore resumes from any checkpoint with any number of ranks, with or without ``--shard``.

Only the trained tensors move. PyTorch's ``torch.distributed.checkpoint.state_dict``
(``get_model_state_dict`` / ``set_model_state_dict`` with ``full_state_dict=True``) works on
the whole model's state dict: it would gather, copy and reload the frozen base as well (the
full 70B on every save, and bitsandbytes' 4-bit weights through their own loaders), so the
few adapter tensors are handled here directly, with the same DTensor calls it makes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from tilpass.train_checkpoints import LoadedCheckpoint


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered whole (a collective); any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor().detach() if isinstance(t, DTensor) else t


class GatheredOptimizer:
    """An optimizer's state dict with its FSDP2-sharded states gathered whole (what the
    checkpoint writer reads; the checkpoint is then the same as one of an unsharded run)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        sd = optimizer.state_dict()
        sd["state"] = {
            i: {k: full_tensor(v) if torch.is_tensor(v) else v for k, v in st.items()}
            for i, st in sd["state"].items()
        }
        self.gathered = sd

    def state_dict(self) -> dict[str, Any]:
        """The gathered state dict."""
        return self.gathered


def gather_state(
    named: list[tuple[str, nn.Parameter]], optimizer: torch.optim.Optimizer
) -> tuple[list[tuple[str, Any]], GatheredOptimizer]:
    """Parameters and optimizer with their shards gathered whole (a collective: every rank
    calls it, in the same order; rank 0 writes what it returns)."""
    return [(n, full_tensor(p)) for n, p in named], GatheredOptimizer(optimizer)


def shard_like(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``whole`` laid out as the DTensor ``like`` (this rank's chunk, no communication: every
    rank read the same whole tensor); a plain tensor for a plain ``like``."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor):
        return whole
    whole = whole.to(device=like.device, dtype=like.dtype)
    return distribute_tensor(whole, like.device_mesh, like.placements, src_data_rank=None)


def place_like(
    loaded: LoadedCheckpoint, named: Sequence[tuple[str, nn.Parameter]]
) -> LoadedCheckpoint:
    """A read checkpoint with its parameters and optimizer states sharded as ``named`` are.

    A parameter's AdamW moments have its shape and are sharded like it; AdamW's ``step`` (a
    scalar) stays whole, as FSDP2's optimizer keeps it. Names that match no parameter pass
    through unchanged, so the usual checks still name them.
    """
    params = dict(named)
    trainable = {
        name: shard_like(t, params[name]) if name in params else t
        for name, t in loaded.trainable.items()
    }
    optimizer: dict[str, torch.Tensor] = {}
    for key, t in loaded.optimizer.items():
        name = key.rpartition("::")[0]
        p = params.get(name)
        fits = p is not None and tuple(t.shape) == tuple(p.shape)
        optimizer[key] = shard_like(t, p) if fits and p is not None else t
    return replace(loaded, trainable=trainable, optimizer=optimizer)


def reshard(model: nn.Module) -> None:
    """Put every ``fully_shard`` unit of ``model`` back in its sharded state (frees gathered
    weights; a no-op for units already sharded), so writes into the shards take effect."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
