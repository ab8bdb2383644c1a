"""Datasets to tokenized, loss-masked batches for training and evaluation.

Sources, chosen by extension: ``.jsonl`` (one JSON object per line), ``.json`` (a list of
objects, or ``{"data": [...]}``), ``.csv`` (a header row; a ``messages`` cell holds a JSON list),
``.parquet``, and a directory written by ``datasets.Dataset.save_to_disk`` (a ``DatasetDict``
with one split, or the split's own subdirectory).

Formats, detected from the first record's keys or forced with ``format=``:

- ``chat``: ``messages``, a list of ``{"role": str, "content": str}``; every ``assistant``
  turn carries loss.
- ``prompt_completion``: ``prompt`` (user turn) and ``completion`` (assistant turn).
- ``alpaca``: ``instruction`` and optional ``input`` (user turn: ``instruction``, a blank line,
  ``input``) and ``output`` (assistant turn).
- ``text``: ``text``, tokenized as is with EOS appended; every token carries loss.

Labels are -100 (``IGNORE_INDEX``) where there is no loss, aligned with ``input_ids`` (the
model shifts them). How chat templates are rendered and masked: ``tilpass.data.templates``.

Modules: ``sources`` (files to validated records), ``templates`` (records to masked token ids),
``batching`` (datasets, collation, length-grouped batches), ``packing`` (the trainer's batch
plan: packed rows with per-example position ids, length-grouped order).

API:

- ``load_records(path, skip_bad_rows=False, format=None) -> (records, DataStats)``
- ``tokenize_record(record, tokenizer, max_length, train_on_prompt=False) -> {input_ids, labels}``
- ``build_dataset(path, tokenizer, ...) -> TokenizedDataset`` (with ``.stats``)
- ``collate(batch, pad_token_id)`` and ``LengthGroupedBatchSampler`` for ``DataLoader``
- ``prompt_ids(record, tokenizer)`` and ``reference_answer(record)`` for generation evaluation
"""

from tilpass.data.batching import (
    LengthGroupedBatchSampler,
    TokenizedDataset,
    build_dataset,
    collate,
)
from tilpass.data.sources import FORMATS, DataError, DataStats, detect_format, load_records
from tilpass.data.templates import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_NO_INPUT,
    IGNORE_INDEX,
    prompt_ids,
    reference_answer,
    tokenize_record,
)

__all__ = [
    "ALPACA_PROMPT",
    "ALPACA_PROMPT_NO_INPUT",
    "FORMATS",
    "IGNORE_INDEX",
    "DataError",
    "DataStats",
    "LengthGroupedBatchSampler",
    "TokenizedDataset",
    "build_dataset",
    "collate",
    "detect_format",
    "load_records",
    "prompt_ids",
    "reference_answer",
    "tokenize_record",
]
