"""Batch plans for training: which examples share an optimizer step, and how they are laid out.

Two independent settings:

- ``group_by_length``: each epoch's micro-batches come from :class:`LengthGroupedBatchSampler`
  (examples of similar length together), seeded by ``(seed, epoch)`` like the random order, so
  a resumed run replays it exactly.
- ``packing``: the examples are concatenated with position ids restarting at 0 for each
  example and no ``attention_mask``, so no token attends across an example boundary. Two
  layouts: on a transformers model whose attention is ``sdpa`` (the default), each
  micro-batch is one padding-free row of its examples, and attention runs once per example
  (:mod:`tilpass.packed_attention`: no mask, ``sum n_i^2`` work); on any other model, the
  step's examples go into rows of at most ``max_length`` tokens (first-fit decreasing), from
  whose position ids the model derives block-diagonal attention (``sdpa`` / ``eager`` build
  the mask, flash attention the ``cu_seqlens``).

Packing only re-lays out the examples a step already has (the same ones the padded run uses),
and the trainer normalises by the step's loss tokens, so a packed run makes the same updates as
a padded one up to float rounding: packing changes speed, never the result.
:func:`check_packing` verifies this on the model at start-up. With several ranks, each rank
packs its own share of the step's examples (:meth:`BatchPlan.packed`; the split is
``tilpass.distributed.DataParallel.packed_step``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tilpass.data.batching import LengthGroupedBatchSampler
from tilpass.data.templates import IGNORE_INDEX
from tilpass.losses import (
    Batch,
    model_device,
    to_device,
    trim_padding,
    unwrap_base,
)
from tilpass.packed_attention import PackedAttention
from tilpass.train_config import epoch_batches

Example = Mapping[str, Sequence[int]]


class PackingError(ValueError):
    """The model cannot train on packed rows (its loss differs from the unpacked loss)."""


@dataclass(frozen=True)
class Batching:
    """How training batches are formed: ``data.packing`` and ``data.group_by_length``."""

    packing: bool = False
    group_by_length: bool = False
    max_length: int = 512  # width of a packed row, in tokens

    def describe(self) -> str:
        """One line for the run's banner."""
        order = "length-grouped" if self.group_by_length else "random"
        if self.packing:
            return (
                f"batching: packed ({order} order; position ids restart per example, attention "
                "stays within each example): one padding-free row per micro-batch on sdpa "
                f"models, else rows of up to {self.max_length} tokens"
            )
        return f"batching: padded micro-batches ({order} order)"


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices into ``lengths`` grouped into rows of at most ``capacity`` tokens.

    First-fit decreasing: longest first, each into the first row with room. Deterministic
    (ties keep index order). An item longer than ``capacity`` gets a row of its own.
    """
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        n = lengths[i]
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(capacity - n)
    return rows


def collate_packed(rows: Sequence[Sequence[Example]], pad_token_id: int) -> Batch:
    """Concatenate each row's examples into ``input_ids``, ``labels`` and ``position_ids``.

    Position ids restart at 0 for every example and each example's first label is -100 (no
    token predicts across a boundary); the padding after a row's last example is a block of
    its own (positions from 0, label -100), so it is attended by nothing real.
    ``real_mask`` marks the example tokens (for token counts; the model never sees it).
    """
    widths = [sum(len(ex["input_ids"]) for ex in row) for row in rows]
    width = max(widths, default=0)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)  # (R, T)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)  # (R, T)
    position_ids = torch.zeros(shape, dtype=torch.long)  # (R, T)
    real = torch.zeros(shape, dtype=torch.bool)  # (R, T)
    for r, row in enumerate(rows):
        at = 0
        for ex in row:
            n = len(ex["input_ids"])
            if len(ex["labels"]) != n:
                raise ValueError(f"packed row {r}: labels and input_ids differ in length")
            input_ids[r, at : at + n] = torch.as_tensor(ex["input_ids"], dtype=torch.long)
            labels[r, at : at + n] = torch.as_tensor(ex["labels"], dtype=torch.long)
            # An example's first label is never a target unpacked; packed, it would make the
            # previous example's last token predict it.
            labels[r, at] = IGNORE_INDEX
            position_ids[r, at : at + n] = torch.arange(n)
            at += n
        position_ids[r, at:] = torch.arange(width - at)
        real[r, :at] = True
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "real_mask": real,
    }


def token_counts(batch: Batch) -> tuple[int, int]:
    """(real tokens, positions computed) of a padded or packed micro-batch."""
    total = int(batch["input_ids"].numel())
    for key in ("real_mask", "attention_mask"):
        mask = batch.get(key)
        if mask is not None and mask.dim() == 2:
            return int(mask.bool().sum()), total
    return total, total


class BatchPlan:
    """The micro-batches of each optimizer step, in a run's chosen batching mode.

    The trainer asks it for an epoch's micro-batches of example indices (:meth:`epoch_batches`)
    and for the tensors of one step (:meth:`micro_batches`). Both are pure functions of the
    data, the settings, the seed and the epoch, so resuming replays them exactly.
    """

    def __init__(
        self,
        dataset: Any,
        collate_fn: Callable[[list[Any]], Batch],
        batch_size: int,
        seed: int,
        batching: Batching | None = None,
        flat: bool = False,
    ) -> None:
        self.dataset, self.collate_fn = dataset, collate_fn
        self.batch_size, self.seed = batch_size, seed
        self.batching = batching or Batching()
        self.flat = flat  # packed: one padding-free row per micro-batch (attention per example)
        self.pad_token_id = int(getattr(dataset, "pad_token_id", 0))
        self._lengths: list[int] | None = None

    @property
    def lengths(self) -> list[int]:
        """Token count per training example (computed once)."""
        if self._lengths is None:
            data = self.dataset
            given = getattr(data, "lengths", None)
            self._lengths = (
                list(given)
                if given is not None
                else [len(data[i]["input_ids"]) for i in range(len(data))]
            )
        return self._lengths

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """Micro-batches of example indices for ``epoch``: random or length-grouped."""
        n = len(self.dataset)
        if not self.batching.group_by_length:
            return epoch_batches(n, self.batch_size, self.seed, epoch)
        sampler = LengthGroupedBatchSampler(self.lengths, self.batch_size, seed=self.seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    def micro_batches(self, index_groups: Sequence[Sequence[int]]) -> list[Batch]:
        """The tensors of one optimizer step over the examples of ``index_groups``.

        Padded: one collated micro-batch per group, trailing all-padding columns dropped.
        Packed and ``flat``: one row per group, its examples back to back (no padding).
        Packed: all the step's examples packed into rows of ``max_length`` tokens, at most
        ``batch_size`` rows per micro-batch (never more micro-batches than groups).
        """
        if not self.batching.packing:
            return [self.padded(idx) for idx in index_groups]
        if self.flat:
            pad = self.pad_token_id
            return [collate_packed([[self.dataset[i] for i in idx]], pad) for idx in index_groups]
        return self.packed([i for idx in index_groups for i in idx], self.batch_size)

    def packed(self, indices: Sequence[int], rows_per_batch: int) -> list[Batch]:
        """Examples ``indices`` packed into rows of ``max_length`` tokens (first-fit
        decreasing), ``rows_per_batch`` rows per micro-batch (also one rank's share of a step,
        in a data-parallel run)."""
        examples = [self.dataset[i] for i in indices]
        rows = pack_rows([len(ex["input_ids"]) for ex in examples], self.batching.max_length)
        laid_out = [[examples[i] for i in row] for row in rows]
        pad = self.pad_token_id
        return [
            collate_packed(laid_out[k : k + rows_per_batch], pad)
            for k in range(0, len(rows), rows_per_batch)
        ]

    def packed_count(self, indices: Sequence[int], rows_per_batch: int) -> int:
        """How many micro-batches :meth:`packed` makes of ``indices`` (without collating)."""
        lengths = [len(self.dataset[i]["input_ids"]) for i in indices]
        return math.ceil(len(pack_rows(lengths, self.batching.max_length)) / rows_per_batch)

    def padded(self, indices: Sequence[int]) -> Batch:
        """One padded micro-batch of examples ``indices``, trailing all-padding columns dropped
        (also a rank's part of a micro-batch, in a data-parallel run)."""
        return trim_padding(self.collate_fn([self.dataset[i] for i in indices]))

    def consumed(self, steps: int, accumulation: int) -> list[int]:
        """Indices of the examples the first ``steps`` optimizer steps train on, in order."""
        per_epoch = math.ceil(math.ceil(len(self.dataset) / self.batch_size) / accumulation)
        out: list[int] = []
        epochs: dict[int, list[list[int]]] = {}
        for step in range(steps):
            epoch, k = divmod(step, per_epoch)
            batches = epochs.setdefault(epoch, self.epoch_batches(epoch))
            out += [i for b in batches[k * accumulation : (k + 1) * accumulation] for i in b]
        return out

    def data_info(self) -> dict[str, Any]:
        """What this plan adds to the settings that fix the data order (none when default)."""
        return {"group_by_length": True} if self.batching.group_by_length else {}


def prepare_packing(model: nn.Module, examples: Sequence[Example]) -> PackedAttention:
    """The attention a packed run uses, checked on the model: per example if it can, else
    the model's own (block-diagonal mask from the position ids).

    Raises:
        PackingError: neither gives a packed row its examples' own logits.
    """
    attention = PackedAttention.for_model(model)
    if attention.enabled:
        try:
            with attention.active():
                check_packing(model, examples)
        except PackingError:
            attention.disable()
    if not attention.enabled:
        check_packing(model, examples)
    return attention


def check_packing(model: nn.Module, examples: Sequence[Example], pad_token_id: int = 0) -> None:
    """Check once that the model's logits on a packed row equal those of its parts run alone.

    Packs up to three examples (at most 32 tokens each) into one row and compares each
    example's logits with the example run by itself. Catches attention implementations or
    wrappers that ignore ``position_ids`` boundaries (a plain module, prompt tuning's virtual
    tokens), which would otherwise train on attention across examples.

    Raises:
        PackingError: the logits differ; the message says to set ``data.packing: false``.
    """
    probe = [list(ex["input_ids"][:32]) for ex in examples[:3] if len(ex["input_ids"]) >= 2]
    if len(probe) < 2:
        return  # nothing to pack together
    items = [{"input_ids": ids, "labels": ids} for ids in probe]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            packed = _logits(model, collate_packed([items], pad_token_id))[0]  # (T, V)
            alone = torch.cat([_logits(model, collate_packed([[it]], 0))[0] for it in items])
    except TypeError as exc:  # a forward that takes no position_ids
        why = f"its forward does not accept position_ids ({exc})"
        raise PackingError(_refusal(model, why)) from None
    finally:
        model.train(was_training)
    low = packed.dtype in (torch.float16, torch.bfloat16)
    scale = float(alone.abs().max()) + 1e-6
    error = float((packed.double() - alone.double()).abs().max()) / scale
    if not error <= (3e-2 if low else 1e-4):
        raise PackingError(
            _refusal(
                model,
                f"the logits of a packed row differ from its examples' run alone (relative "
                f"error {error:.2g}): attention crosses example boundaries",
            )
        )


def _logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The model's logits on a packed batch, (R, T, V)."""
    batch = to_device(batch, model_device(model))
    extra = {"use_cache": False} if hasattr(unwrap_base(model), "config") else {}
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], **extra)
    logits = out.logits if hasattr(out, "logits") else out[0] if isinstance(out, tuple) else out
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"the forward returned {type(out).__name__}, not logits")
    return logits


def _refusal(model: nn.Module, why: str) -> str:
    impl = getattr(getattr(unwrap_base(model), "config", None), "_attn_implementation", None)
    kind = f" (attention implementation {impl!r})" if impl else ""
    return (
        f"data.packing cannot be used with this model{kind}: {why}. Set data.packing: false "
        "(--data.packing false), or use data.group_by_length: true to cut padding instead"
    )
