"""Data files to validated records: readers, format detection, row checks, bad-row handling.

Each reader yields ``(location, value)`` per row; the location (file and line or row) goes into
every error message. A row that does not parse or validate raises a ``DataError`` naming it, or
with ``skip_bad_rows`` is skipped and counted in ``DataStats.n_bad_rows``.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMATS: tuple[str, ...] = ("chat", "prompt_completion", "alpaca", "text")

_SKIP_HINT = (
    "Fix the row, or skip bad rows: tilpass train / eval --skip-bad-rows (data.skip_bad_rows: "
    "true in a run config; skip_bad_rows=True in Python)."
)
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
            raise DataError(
                f"{path}, line {e.lineno}, column {e.colno}: invalid JSON ({e.msg}); fix the file"
            ) from e
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
        column = i - text.rfind("\n", 0, i)  # 1-based, in characters
        return DataError(f"{path}, line {line_at(i)}, column {column}: {what}; {hint}")

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


def _answer(record: Mapping[str, Any], key: str) -> str:
    """A required answer field: a string with some text (an empty answer trains the model to
    stop at once, and is almost always a data mistake)."""
    value = _string(record, key)
    if not value.strip():
        raise _RowError(f'"{key}" is empty; expected the answer text')
    return value


def _normalize(value: Any, fmt: str) -> dict[str, Any]:
    """Check one record against its format and keep only that format's fields."""
    if not isinstance(value, Mapping):
        raise _RowError(f"expected a JSON object, got {_type_name(value)}")
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
        for j, message in enumerate(clean):
            if message["role"] == "assistant" and not message["content"].strip():
                raise _RowError(f'messages[{j}] is an assistant message with empty "content"')
        return {"messages": clean}
    if fmt == "prompt_completion":
        return {"prompt": _string(value, "prompt"), "completion": _answer(value, "completion")}
    if fmt == "alpaca":
        return {
            "instruction": _string(value, "instruction"),
            "input": _string(value, "input", optional=True),
            "output": _answer(value, "output"),
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


def peek_format(path: str | Path) -> str | None:
    """The format of a data file's first record, read without loading the rest (None if the
    first record is not an object or has none of the formats' keys)."""
    for _, value in _iter_rows(Path(path)):
        return detect_format(value) if isinstance(value, Mapping) else None
    return None


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
                    '"text" (or set the format: data.format in a run config, --data.format on '
                    "the command line, format= in Python)"
                )
        try:
            if isinstance(value, _Bad):
                raise _RowError(value.reason)
            records.append(_normalize(value, stats.format))
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
