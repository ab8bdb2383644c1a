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

The first three go through ``tokenizer.apply_chat_template``. Without a chat template,
``prompt_completion`` is rendered verbatim as ``prompt + completion + eos`` (the data carries
its own format) and ``alpaca`` in the Stanford Alpaca prompt format (``ALPACA_PROMPT``) followed
by ``output + eos``; ``chat`` raises a ``DataError``.

Loss masking: the conversation is rendered once in full, and for each assistant turn ``i`` the
prefix ``messages[:i]`` is rendered with ``add_generation_prompt=True`` (where the answer
starts) and ``messages[:i+1]`` without (where it ends, trailing whitespace after the
end-of-turn token dropped, so the loss is on exactly the answer and e.g. ``<|im_end|>``). Both
must be string prefixes of the full render; the character spans become token labels through
the tokenizer's offset mapping (without offsets: prefix token counts, verified to be a prefix
of the full tokens, else each piece is tokenized separately). If a template is not
prefix-stable (it rewrites earlier turns), only the final assistant turn carries loss: the
text is the render up to and including it, or, if even the generation prompt is not a prefix,
``generation prompt + answer + eos`` (what the model sees at inference). Such examples are
counted in ``DataStats.n_template_fallback``. An assistant turn with no message before it is
context (no prompt to render). Labels are -100 where there is no loss, aligned with
``input_ids`` (the model shifts them).

Over-long examples are cut to ``max_length`` tokens (counted). Examples left with no loss
token are counted and dropped; if all are, a ``DataError`` names the template and shows one.

API:

- ``load_records(path, skip_bad_rows=False, format=None) -> (records, DataStats)``
- ``tokenize_record(record, tokenizer, max_length, train_on_prompt=False) -> {input_ids, labels}``
- ``build_dataset(path, tokenizer, ...) -> TokenizedDataset`` (with ``.stats``)
- ``collate(batch, pad_token_id)`` and ``LengthGroupedBatchSampler`` for ``DataLoader``
- ``prompt_ids(record, tokenizer)`` and ``reference_answer(record)`` for generation evaluation
"""

from __future__ import annotations

import csv
import itertools
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

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

IGNORE_INDEX = -100
FORMATS: tuple[str, ...] = ("chat", "prompt_completion", "alpaca", "text")

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)

_SKIP_HINT = "Fix the row, or pass --skip-bad-rows (skip_bad_rows=True) to skip bad rows."
_MESSAGE_SHAPE = 'a list of {"role": str, "content": str} objects'


class DataError(ValueError):
    """Bad input data; the message names the file, the row and what was expected."""


class _RowError(ValueError):
    """A problem with one record; the caller adds its location."""


@dataclass
class DataStats:
    """Counts from loading and tokenizing one data file, for the training log."""

    path: str = ""
    format: str = ""
    n_rows: int = 0
    n_bad_rows: int = 0
    n_examples: int = 0
    n_truncated: int = 0
    n_all_masked: int = 0
    n_template_fallback: int = 0
    n_tokens: int = 0
    n_loss_tokens: int = 0
    max_length: int | None = None

    def summary(self) -> str:
        """One line for the log: rows, skips, truncation, masking and token counts."""
        parts = [f"{self.path}: {self.n_rows} rows ({self.format})"]
        if self.n_bad_rows:
            parts.append(f"{self.n_bad_rows} bad rows skipped")
        parts.append(f"{self.n_examples} examples")
        if self.n_truncated:
            parts.append(f"{self.n_truncated} truncated to {self.max_length} tokens")
        if self.n_all_masked:
            parts.append(f"{self.n_all_masked} with no answer tokens left (dropped)")
        if self.n_template_fallback:
            parts.append(
                f"{self.n_template_fallback} not prefix-stable under the chat template "
                "(loss on the final answer only)"
            )
        share = self.n_loss_tokens / self.n_tokens if self.n_tokens else 0.0
        parts.append(f"{self.n_tokens} tokens, {self.n_loss_tokens} with loss ({share:.1%})")
        return ", ".join(parts)


# ---------------------------------------------------------------------------------------------
# Reading rows: each reader yields (location, value); a value that could not be parsed is _Bad.


@dataclass
class _Bad:
    reason: str


def _iter_rows(path: Path) -> Iterator[tuple[str, Any]]:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_dir():
        return _rows_disk(path)
    readers = {".jsonl": _rows_jsonl, ".json": _rows_json, ".csv": _rows_csv}
    readers[".parquet"] = _rows_parquet
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise DataError(
            f"{path}: unsupported file type {path.suffix!r}; expected .jsonl, .json, .csv, "
            ".parquet or a directory written by datasets' save_to_disk"
        )
    return reader(path)


def _rows_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            loc = f"{path}, line {lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield loc, _Bad(f"the line is not valid UTF-8 ({e.reason})")
                continue
            if not line.strip():
                continue
            try:
                yield loc, json.loads(line)
            except json.JSONDecodeError as e:
                yield loc, _Bad(f"invalid JSON ({e.msg} at column {e.colno}); expected one object")


def _rows_json(path: Path) -> Iterator[tuple[str, Any]]:
    text = path.read_text(encoding="utf-8-sig")
    start = len(text) - len(text.lstrip())
    if text.startswith("{", start):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {e.lineno}: invalid JSON ({e.msg}); fix the file") from e
        data = obj.get("data")
        if not isinstance(data, list):
            raise DataError(f'{path}: expected a JSON list of records or {{"data": [...]}}')
        for k, value in enumerate(data, 1):
            yield f"{path}, record {k} of data", value
        return
    if not text.startswith("[", start):
        raise DataError(f'{path}, line 1: expected a JSON list of records or {{"data": [...]}}')
    # Decode element by element so that each record knows its line number.
    decoder = json.JSONDecoder()
    pos, line, counted = start + 1, 1, 0

    def line_at(i: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, i)
        counted = i
        return line

    def fail(i: int, what: str) -> DataError:
        hint = "fix the file (a broken JSON list cannot be skipped row by row; JSONL can)"
        return DataError(f"{path}, line {line_at(i)}: {what}; {hint}")

    expect_value = True
    while True:
        pos = _skip_ws(text, pos)
        if text.startswith("]", pos):
            if _skip_ws(text, pos + 1) != len(text):
                raise fail(pos + 1, "invalid JSON (extra data after the list)")
            return
        if not expect_value:
            raise fail(pos, "invalid JSON (expected ',' or ']' after a record)")
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise fail(e.pos, f"invalid JSON ({e.msg})") from e
        yield f"{path}, line {line_at(pos)}", value
        pos = _skip_ws(text, end)
        expect_value = text.startswith(",", pos)
        pos += expect_value


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _rows_csv(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        for k, row in enumerate(reader, 1):
            loc = f"{path}, row {k} (line {reader.line_num})"
            if None in row:
                yield loc, _Bad("the row has more cells than the header")
                continue
            messages = row.get("messages")
            if messages is not None and messages.lstrip().startswith("["):
                # A CSV cell is text; a chat is stored as a JSON list in the cell.
                try:
                    row["messages"] = json.loads(messages)
                except json.JSONDecodeError as e:
                    yield loc, _Bad(f'invalid JSON in the "messages" cell ({e.msg})')
                    continue
            yield loc, row


def _rows_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for a bad file
        raise DataError(f"{path}: cannot read the Parquet file ({e})") from e
    for k, row in enumerate(rows, 1):
        yield f"{path}, row {k}", row


def _rows_disk(path: Path) -> Iterator[tuple[str, Any]]:
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except FileNotFoundError as e:
        raise DataError(
            f"{path}: not a dataset directory written by datasets' save_to_disk ({e})"
        ) from e
    if isinstance(ds, DatasetDict):
        if len(ds) != 1:
            raise DataError(
                f"{path}: the DatasetDict has splits {sorted(ds)}; pass one split's directory, "
                f"e.g. {path / sorted(ds)[0]}"
            )
        ds = next(iter(ds.values()))
    for k, row in enumerate(ds, 1):
        yield f"{path}, row {k}", row


# ---------------------------------------------------------------------------------------------
# Formats: detection and validation into plain records.


def detect_format(record: Mapping[str, Any]) -> str | None:
    """The format whose key the record has, or None; a missing partner field is reported later."""
    keys = set(record)
    if "messages" in keys:
        return "chat"
    if keys & {"prompt", "completion"}:
        return "prompt_completion"
    if keys & {"instruction", "output"}:
        return "alpaca"
    if "text" in keys:
        return "text"
    return None


def _type_name(value: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    names |= {int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _string(record: Mapping[str, Any], key: str, optional: bool = False) -> str:
    if key not in record or (optional and record[key] is None):
        if optional:
            return ""
        raise _RowError(f'missing field "{key}" (expected a string)')
    value = record[key]
    if not isinstance(value, str):
        raise _RowError(f'expected "{key}" to be a string, got {_type_name(value)}')
    return value


def _normalize(value: Any, fmt: str) -> dict[str, Any]:
    """Check one record against its format and keep only that format's fields."""
    if not isinstance(value, Mapping):
        raise _RowError(f"expected an object with the {fmt} fields, got {_type_name(value)}")
    if fmt == "chat":
        if "messages" not in value:
            raise _RowError(f'missing field "messages" (expected {_MESSAGE_SHAPE})')
        messages = value["messages"]
        if not isinstance(messages, list) or not messages:
            got = "an empty list" if isinstance(messages, list) else _type_name(messages)
            raise _RowError(f'expected "messages" to be {_MESSAGE_SHAPE}, got {got}')
        clean = []
        for j, message in enumerate(messages):
            if not isinstance(message, Mapping):
                raise _RowError(
                    f"expected messages[{j}] to be an object, got {_type_name(message)}"
                )
            for key in ("role", "content"):
                if not isinstance(message.get(key), str):
                    got = _type_name(message.get(key)) if key in message else "nothing"
                    raise _RowError(f'expected messages[{j}]["{key}"] to be a string, got {got}')
            clean.append({"role": message["role"], "content": message["content"]})
        if not any(m["role"] == "assistant" for m in clean):
            raise _RowError('expected at least one message with role "assistant"')
        return {"messages": clean}
    if fmt == "prompt_completion":
        return {"prompt": _string(value, "prompt"), "completion": _string(value, "completion")}
    if fmt == "alpaca":
        return {
            "instruction": _string(value, "instruction"),
            "input": _string(value, "input", optional=True),
            "output": _string(value, "output"),
        }
    if fmt == "text":
        return {"text": _string(value, "text")}
    raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")


def _record_format(record: Mapping[str, Any], fmt: str | None) -> str:
    fmt = fmt or detect_format(record)
    if fmt is None:
        raise DataError(
            f"cannot tell the format of a record with keys {sorted(record)}; expected "
            '"messages", "prompt"/"completion", "instruction"/"output" or "text"'
        )
    return fmt


def _load(
    path: str | Path, skip_bad_rows: bool, format: str | None
) -> tuple[list[dict[str, Any]], list[str], DataStats]:
    if format is not None and format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; expected one of {', '.join(FORMATS)}")
    path = Path(path)
    stats = DataStats(path=str(path), format=format or "")
    records: list[dict[str, Any]] = []
    locations: list[str] = []
    for loc, value in _iter_rows(path):
        stats.n_rows += 1
        if not stats.format and isinstance(value, Mapping):
            stats.format = detect_format(value) or ""
            if not stats.format:
                raise DataError(
                    f"{loc}: cannot tell the data format from the keys {sorted(value)}; expected "
                    '"messages", "prompt" and "completion", "instruction" and "output", or '
                    '"text" (or pass format=)'
                )
        try:
            if isinstance(value, _Bad):
                raise _RowError(value.reason)
            records.append(_normalize(value, stats.format or "chat"))
            locations.append(loc)
        except _RowError as e:
            if not skip_bad_rows:
                raise DataError(f"{loc}: {e}. {_SKIP_HINT}") from None
            stats.n_bad_rows += 1
    if not records:
        skipped = f" ({stats.n_bad_rows} bad rows skipped)" if stats.n_bad_rows else ""
        raise DataError(f"{path}: no records{skipped}")
    return records, locations, stats


def load_records(
    path: str | Path, skip_bad_rows: bool = False, format: str | None = None
) -> tuple[list[dict[str, Any]], DataStats]:
    """Read and validate a data file into plain records holding only their format's fields.

    Args:
        path: a .jsonl, .json, .csv or .parquet file, or a save_to_disk directory.
        skip_bad_rows: skip and count rows that do not parse or validate, instead of raising.
        format: one of ``FORMATS``; detected from the first record when None.

    Raises:
        DataError: a bad row (file, line or row, what was expected), or no records.
    """
    records, _, stats = _load(path, skip_bad_rows, format)
    return records, stats


# ---------------------------------------------------------------------------------------------
# Rendering and tokenization.


@dataclass
class _Rendered:
    text: str
    spans: list[tuple[int, int]]  # character spans that carry loss
    add_special_tokens: bool  # True when the text is not from a chat template
    fallback: bool = False


@dataclass
class _Encoded:
    input_ids: list[int]
    labels: list[int]
    text: str
    truncated: bool
    fallback: bool


def _has_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _tokenizer_name(tokenizer: Any) -> str:
    return getattr(tokenizer, "name_or_path", "") or "<unnamed>"


def _template_name(tokenizer: Any) -> str:
    name = _tokenizer_name(tokenizer)
    if _has_template(tokenizer):
        return f"the chat template of tokenizer '{name}'"
    return f"the fallback format (tokenizer '{name}' has no chat template)"


def _messages(record: Mapping[str, Any], fmt: str) -> list[dict[str, str]]:
    if fmt == "chat":
        return list(record["messages"])
    if fmt == "prompt_completion":
        user, answer = record["prompt"], record["completion"]
    else:
        extra = record.get("input") or ""
        user = record["instruction"] + (f"\n\n{extra}" if extra else "")
        answer = record["output"]
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def _plain_prompt(record: Mapping[str, Any], fmt: str) -> str:
    """The prompt text in the no-template fallback format."""
    if fmt == "prompt_completion":
        return record["prompt"]
    template = ALPACA_PROMPT if record.get("input") else ALPACA_PROMPT_NO_INPUT
    return template.format(instruction=record["instruction"], input=record.get("input") or "")


def _render_chat(tokenizer: Any, messages: list[dict[str, str]], generation: bool) -> str:
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation
        )
    except Exception as e:  # Jinja and template-raised errors are row problems
        raise _RowError(f"{_template_name(tokenizer)} failed on this record ({e})") from e
    return str(text)


def _render(record: Mapping[str, Any], fmt: str, tokenizer: Any) -> _Rendered:
    eos = getattr(tokenizer, "eos_token", None) or ""
    if fmt == "text":
        text = record["text"]
        return _Rendered(text, [(0, len(text))], add_special_tokens=True)
    if not _has_template(tokenizer):
        if fmt == "chat":
            raise DataError(
                f"tokenizer '{_tokenizer_name(tokenizer)}' has no chat template; chat "
                '("messages") data needs one. Use a tokenizer with a chat template (e.g. an '
                "-Instruct model's) or set tokenizer.chat_template."
            )
        prompt = _plain_prompt(record, fmt)
        answer = record["completion"] if fmt == "prompt_completion" else record["output"]
        text = prompt + answer + eos
        return _Rendered(text, [(len(prompt), len(text))], add_special_tokens=True)

    messages = _messages(record, fmt)
    full = _render_chat(tokenizer, messages, generation=False)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i > 0]
    spans = []
    for i in turns:
        start = _render_chat(tokenizer, messages[:i], generation=True)
        end = _render_chat(tokenizer, messages[: i + 1], generation=False)
        if not (full.startswith(start) and full.startswith(end) and len(end) >= len(start)):
            break
        spans.append((len(start), max(len(start), len(end.rstrip()))))
    else:
        return _Rendered(full, spans, add_special_tokens=False)

    # Not prefix-stable: train on the final answer alone, rendered as the model will see it.
    last = turns[-1]
    start = _render_chat(tokenizer, messages[:last], generation=True)
    end = _render_chat(tokenizer, messages[: last + 1], generation=False)
    if end.startswith(start):
        span = (len(start), max(len(start), len(end.rstrip())))
        return _Rendered(end, [span], add_special_tokens=False, fallback=True)
    text = start + messages[last]["content"] + eos
    return _Rendered(text, [(len(start), len(text))], add_special_tokens=False, fallback=True)


def _tokenize(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def _token_mask(tokenizer: Any, rendered: _Rendered) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered text and, per token, whether it overlaps a loss span."""
    text, spans = rendered.text, rendered.spans
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(
            text, add_special_tokens=rendered.add_special_tokens, return_offsets_mapping=True
        )
        ids = list(enc["input_ids"])
        # A token carries loss when its characters overlap a loss span.
        offsets = [(int(a), int(b)) for a, b in enc["offset_mapping"]]
        mask = [a < b and any(a < t and s < b for s, t in spans) for a, b in offsets]
        return ids, mask
    # No offsets: count the tokens of each prefix, verified to be a prefix of the full tokens.
    ids = _tokenize(tokenizer, text, rendered.add_special_tokens)
    cuts: dict[int, int] = {}
    for b in sorted({x for span in spans for x in span}):
        head = _tokenize(tokenizer, text[:b], rendered.add_special_tokens)
        if ids[: len(head)] != head:
            break
        cuts[b] = len(head)
    else:
        mask = [False] * len(ids)
        for s, t in spans:
            mask[cuts[s] : cuts[t]] = [True] * (cuts[t] - cuts[s])
        return ids, mask
    # Token merges across a boundary: tokenize each piece on its own so labels stay aligned.
    bounds = sorted({0, len(text), *(x for span in spans for x in span)})
    ids, mask = [], []
    for a, b in itertools.pairwise(bounds):
        piece = _tokenize(tokenizer, text[a:b], rendered.add_special_tokens and a == 0)
        ids += piece
        mask += [any(s <= a and b <= t for s, t in spans)] * len(piece)
    return ids, mask


def _encode(
    record: Mapping[str, Any],
    fmt: str,
    tokenizer: Any,
    max_length: int,
    train_on_prompt: bool,
) -> _Encoded:
    rendered = _render(record, fmt, tokenizer)
    ids, mask = _token_mask(tokenizer, rendered)
    eos_id = getattr(tokenizer, "eos_token_id", None)
    if fmt == "text" and eos_id is not None and (not ids or ids[-1] != eos_id):
        ids.append(eos_id)
        mask.append(True)
    truncated = len(ids) > max_length
    ids, mask = ids[:max_length], mask[:max_length]
    labels = [t if (m or train_on_prompt) else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)]
    return _Encoded(ids, labels, rendered.text, truncated, rendered.fallback)


def tokenize_record(
    record: Mapping[str, Any],
    tokenizer: Any,
    max_length: int,
    train_on_prompt: bool = False,
    format: str | None = None,
) -> dict[str, list[int]]:
    """Tokenize one record with loss on the answer tokens only (all tokens if train_on_prompt).

    Args:
        record: a record in any of ``FORMATS`` (raw or from ``load_records``).
        tokenizer: a Hugging Face tokenizer; its chat template is used when it has one.
        max_length: examples are cut to this many tokens.
        train_on_prompt: put loss on every token, prompt included.
        format: force a format; detected from the record's keys when None.

    Returns:
        ``input_ids`` and ``labels`` (same length; -100 where there is no loss).
    """
    fmt = _record_format(record, format)
    try:
        enc = _encode(_normalize(record, fmt), fmt, tokenizer, max_length, train_on_prompt)
    except _RowError as e:
        raise DataError(str(e)) from None
    return {"input_ids": enc.input_ids, "labels": enc.labels}


def prompt_ids(record: Mapping[str, Any], tokenizer: Any, format: str | None = None) -> list[int]:
    """Token ids of everything before the final answer, ending in the generation prompt.

    Used for generation-based evaluation: generate from these ids and compare the decoded
    output with ``reference_answer(record)``.
    """
    fmt = _record_format(record, format)
    if fmt == "text":
        raise DataError('a "text" record has no prompt and answer to evaluate')
    try:
        clean = _normalize(record, fmt)
        if not _has_template(tokenizer):
            if fmt == "chat":
                _render(clean, fmt, tokenizer)  # raises the no-template error
            return _tokenize(tokenizer, _plain_prompt(clean, fmt), add_special_tokens=True)
        messages = _messages(clean, fmt)
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        if last == 0:
            raise _RowError("the only assistant message has no message before it")
        text = _render_chat(tokenizer, messages[:last], generation=True)
    except _RowError as e:
        raise DataError(str(e)) from None
    return _tokenize(tokenizer, text, add_special_tokens=False)


def reference_answer(record: Mapping[str, Any], format: str | None = None) -> str:
    """The final answer: the last assistant message, the completion, or the output."""
    fmt = _record_format(record, format)
    try:
        clean = _normalize(record, fmt)
    except _RowError as e:
        raise DataError(str(e)) from None
    if fmt == "chat":
        return [m for m in clean["messages"] if m["role"] == "assistant"][-1]["content"]
    if fmt == "prompt_completion":
        return clean["completion"]
    if fmt == "alpaca":
        return clean["output"]
    raise DataError('a "text" record has no answer to evaluate')


# ---------------------------------------------------------------------------------------------
# Dataset, collation and batching.


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
        shown = enc.text if len(enc.text) <= 2000 else enc.text[:2000] + "..."
        raise DataError(
            f"{stats.path}: all {stats.n_all_masked} examples have no answer tokens after "
            f"tokenization with {_template_name(tokenizer)} and max_length={max_length}: the "
            "template does not render the answer where its generation prompt ends, or "
            "truncation cut every answer (raise --max-length). Rendered example "
            f"({loc}, {len(enc.input_ids)} tokens kept):\n{shown}"
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
