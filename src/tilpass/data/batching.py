"""Tokenized datasets, collation into padded tensors, and length-grouped batch sampling.

Examples left with no loss token after tokenization are counted and dropped; if all are, a
``DataError`` names the template and shows one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from tilpass.data.sources import _SKIP_HINT, DataError, DataStats, _load, _RowError
from tilpass.data.templates import (
    IGNORE_INDEX,
    _encode,
    _Encoded,
    _has_template,
    _render,
    _template_name,
)


class TokenizedDataset(Dataset[dict[str, list[int]]]):
    """Tokenized examples with their load statistics; items are ``input_ids`` and ``labels``."""

    def __init__(
        self, examples: list[dict[str, list[int]]], stats: DataStats, pad_token_id: int
    ) -> None:
        self.examples = examples
        self.stats = stats
        self.pad_token_id = pad_token_id

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.examples[index]

    @property
    def lengths(self) -> list[int]:
        """Token count per example, for ``LengthGroupedBatchSampler``."""
        return [len(ex["input_ids"]) for ex in self.examples]


def _pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0  # any id works: padding is masked out of attention and loss


def build_dataset(
    path: str | Path,
    tokenizer: Any,
    max_length: int = 512,
    train_on_prompt: bool = False,
    skip_bad_rows: bool = False,
    format: str | None = None,
) -> TokenizedDataset:
    """Load, validate and tokenize a data file into a dataset of masked examples.

    Examples with no loss token left (answer cut by truncation, or a template that does not
    render the answer) are counted and dropped, since they would contribute 0/0 to the loss.

    Raises:
        DataError: a bad row (unless skip_bad_rows), chat data without a chat template, or
            every example with no loss token (the message names the template and shows one).
    """
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    records, locations, stats = _load(path, skip_bad_rows, format)
    stats.max_length = max_length
    if stats.format == "chat" and not _has_template(tokenizer):
        _render(records[0], "chat", tokenizer)  # raises the no-template error
    examples: list[dict[str, list[int]]] = []
    masked_example: tuple[str, _Encoded] | None = None
    for record, loc in zip(records, locations, strict=True):
        try:
            enc = _encode(record, stats.format, tokenizer, max_length, train_on_prompt)
        except _RowError as e:
            if not skip_bad_rows:
                raise DataError(f"{loc}: {e}. {_SKIP_HINT}") from None
            stats.n_bad_rows += 1
            continue
        stats.n_truncated += enc.truncated
        stats.n_template_fallback += enc.fallback
        n_loss = sum(label != IGNORE_INDEX for label in enc.labels)
        if n_loss == 0:
            stats.n_all_masked += 1
            masked_example = masked_example or (loc, enc)
            continue
        examples.append({"input_ids": enc.input_ids, "labels": enc.labels})
        stats.n_tokens += len(enc.input_ids)
        stats.n_loss_tokens += n_loss
    stats.n_examples = len(examples)
    if not examples and masked_example is not None:
        loc, enc = masked_example
        kept = tokenizer.decode(enc.input_ids)  # what training sees: the truncated text
        shown = kept if len(kept) <= 2000 else kept[:2000] + "..."
        cut = " (cut here by max_length)" if enc.truncated else ""
        raise DataError(
            f"{stats.path}: all {stats.n_all_masked} examples have no answer tokens after "
            f"tokenization with {_template_name(tokenizer)} and max_length={max_length}: the "
            "template does not render the answer where its generation prompt ends, or "
            "truncation cut every answer (raise data.max_length, --data.max_length on the "
            f"command line). Example as tokenized ({loc}, {len(enc.input_ids)} tokens kept"
            f"{cut}):\n{shown}"
        )
    if not examples:
        raise DataError(f"{stats.path}: no usable examples ({stats.n_bad_rows} bad rows skipped)")
    return TokenizedDataset(examples, stats, _pad_id(tokenizer))


def collate(
    batch: Sequence[Mapping[str, Sequence[int]]],
    pad_token_id: int,
    pad_to_multiple_of: int | None = None,
) -> dict[str, Tensor]:
    """Right-pad a batch into ``input_ids``, ``attention_mask`` and ``labels`` tensors.

    Padding gets ``pad_token_id``, attention 0 and label -100. ``labels`` is present only when
    the examples have them (evaluation prompts need not).
    """
    lengths = [len(ex["input_ids"]) for ex in batch]
    width = max(lengths, default=0)
    if pad_to_multiple_of:
        width = math.ceil(width / pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)  # (B, T)
    has_labels = all("labels" in ex for ex in batch)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    for row, (ex, n) in enumerate(zip(batch, lengths, strict=True)):
        input_ids[row, :n] = torch.as_tensor(ex["input_ids"], dtype=torch.long)
        attention_mask[row, :n] = 1
        if has_labels:
            if len(ex["labels"]) != n:
                raise ValueError(f"example {row}: labels and input_ids differ in length")
            labels[row, :n] = torch.as_tensor(ex["labels"], dtype=torch.long)
    out = {"input_ids": input_ids, "attention_mask": attention_mask}
    if has_labels:
        out["labels"] = labels
    return out


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Batches of examples of similar length, so little compute goes to padding.

    With shuffle, indices are shuffled, cut into groups of ``batch_size * group_batches``, sorted
    by length within each group and split into batches; batch order is shuffled except that the
    batch holding the longest example comes first (an out-of-memory shows up at step one).
    Without shuffle (evaluation), all examples are sorted longest first. Call ``set_epoch`` to
    reshuffle each epoch; the order depends only on seed and epoch.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        group_batches: int = 50,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.group_batches = group_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order ``__iter__`` gives."""
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        n, size = len(self.lengths), self.batch_size
        by_length = self.lengths.__getitem__
        if not self.shuffle:
            order = sorted(range(n), key=by_length, reverse=True)
            batches = [order[i : i + size] for i in range(0, n, size)]
        else:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            perm = torch.randperm(n, generator=generator).tolist()
            group = size * self.group_batches
            batches = []
            for g in range(0, n, group):
                chunk = sorted(perm[g : g + group], key=by_length, reverse=True)
                batches += [chunk[i : i + size] for i in range(0, len(chunk), size)]
            shuffled = torch.randperm(len(batches), generator=generator).tolist()
            batches = [batches[i] for i in shuffled]
        if self.drop_last:  # at most one batch is short, anywhere after shuffling
            batches = [b for b in batches if len(b) == size]
        if self.shuffle and batches:
            longest = max(range(len(batches)), key=lambda i: by_length(batches[i][0]))
            batches.insert(0, batches.pop(longest))
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        n = len(self.lengths)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)
