"""Tests for tilpass.data: sources, formats, token-by-token loss masks, bad rows, batching."""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader

from tilpass.data import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_NO_INPUT,
    IGNORE_INDEX,
    DataError,
    LengthGroupedBatchSampler,
    build_dataset,
    collate,
    load_records,
    prompt_ids,
    reference_answer,
    tokenize_record,
)

END = "<|im_end|>"

CHAT = {
    "messages": [
        {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "The answer is four."},
    ]
}
MULTI = {
    "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Translate hello world"},
        {"role": "assistant", "content": "hei verden"},
        {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "four"},
    ]
}
PC = {"prompt": "Translate hello world", "completion": "hei verden"}
PC2 = {"prompt": "What is two plus two?", "completion": " four"}
ALPACA = {
    "instruction": "Summarize the text below.",
    "input": "The quick brown fox jumps over the lazy dog.",
    "output": "A fox jumps.",
}
ALPACA_NO_INPUT = {"instruction": "Translate hello world", "output": "hei verden"}
TEXT = {"text": "The quick brown fox jumps over the lazy dog."}
TEXT2 = {"text": "hei verden"}

RECORDS = {
    "chat": [CHAT, MULTI],
    "prompt_completion": [PC, PC2],
    "alpaca": [ALPACA, ALPACA_NO_INPUT],
    "text": [TEXT, TEXT2],
}
NORMALIZED = {**RECORDS, "alpaca": [ALPACA, {**ALPACA_NO_INPUT, "input": ""}]}
KINDS = ["jsonl", "json", "csv", "parquet", "disk"]


def write(tmp_path: Path, kind: str, rows: list[Any], name: str = "data") -> Path:
    """Write rows as one of the supported sources and return its path."""
    if kind == "disk":
        from datasets import Dataset

        path = tmp_path / name
        Dataset.from_list(rows).save_to_disk(str(path))
        return path
    path = tmp_path / f"{name}.{kind}"
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif kind == "json":
        path.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    elif kind == "csv":
        columns = list(dict.fromkeys(k for r in rows for k in r))
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            for r in rows:
                writer.writerow({k: json.dumps(v) if k == "messages" else v for k, v in r.items()})
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_lines(tmp_path: Path, lines: list[str], name: str = "data.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def runs(tok: Any, example: dict[str, list[int]]) -> list[tuple[bool, str]]:
    """Split an example into runs of (carries loss, decoded text), checking labels == ids."""
    ids, labels = example["input_ids"], example["labels"]
    assert len(ids) == len(labels)
    out = []
    for loss, group in itertools.groupby(zip(ids, labels, strict=True), lambda p: p[1] != -100):
        pairs = list(group)
        if loss:
            assert [label for _, label in pairs] == [i for i, _ in pairs]
        out.append((loss, tok.decode([i for i, _ in pairs])))
    return out


def user(text: str) -> str:
    return f"<|im_start|>user\n{text}{END}\n"


ASSISTANT = "<|im_start|>assistant\n"


# --- sources x formats -----------------------------------------------------------------------


@pytest.mark.parametrize("fmt", list(RECORDS))
@pytest.mark.parametrize("kind", KINDS)
def test_every_format_from_every_source(
    tmp_path: Path, tiny_tokenizer: Any, kind: str, fmt: str
) -> None:
    path = write(tmp_path, kind, RECORDS[fmt])
    records, stats = load_records(path)
    assert records == NORMALIZED[fmt]
    assert (stats.format, stats.n_rows, stats.n_bad_rows) == (fmt, 2, 0)

    ds = build_dataset(path, tiny_tokenizer, max_length=256)
    assert len(ds) == ds.stats.n_examples == 2
    assert ds[0] == tokenize_record(RECORDS[fmt][0], tiny_tokenizer, 256)
    assert ds.stats.n_tokens == sum(ds.lengths)
    assert 0 < ds.stats.n_loss_tokens <= ds.stats.n_tokens


def test_json_object_with_data_list(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    path.write_text(json.dumps({"data": [PC, PC2]}))
    assert load_records(path)[0] == [PC, PC2]


def test_dataset_dict_directory(tmp_path: Path) -> None:
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list([PC])}).save_to_disk(str(tmp_path / "one"))
    assert load_records(tmp_path / "one")[0] == [PC]
    two = DatasetDict({"train": Dataset.from_list([PC]), "test": Dataset.from_list([PC2])})
    two.save_to_disk(str(tmp_path / "two"))
    with pytest.raises(DataError, match="pass one split's directory"):
        load_records(tmp_path / "two")
    assert load_records(tmp_path / "two" / "test")[0] == [PC2]


def test_format_forced_and_extra_columns_dropped(tmp_path: Path) -> None:
    path = write(tmp_path, "jsonl", [{"id": 1, "text": "hi", "prompt": "p", "completion": "c"}])
    assert load_records(path)[0] == [{"prompt": "p", "completion": "c"}]
    assert load_records(path, format="text")[0] == [{"text": "hi"}]
    with pytest.raises(ValueError, match="unknown format"):
        load_records(path, format="sharegpt")


def test_unknown_keys_and_unsupported_files(tmp_path: Path) -> None:
    path = write(tmp_path, "jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"data\.jsonl, line 1: cannot tell the data format"):
        load_records(path)
    other = tmp_path / "data.txt"
    other.write_text("hello")
    with pytest.raises(DataError, match="unsupported file type"):
        load_records(other)
    with pytest.raises(FileNotFoundError):
        load_records(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no records"):
        load_records(tmp_path / "empty.jsonl")


# --- loss masks, token by token ----------------------------------------------------------------


def test_chat_mask(tiny_tokenizer: Any) -> None:
    ex = tokenize_record(CHAT, tiny_tokenizer, 256)
    assert runs(tiny_tokenizer, ex) == [
        (False, user("What is two plus two?") + ASSISTANT),
        (True, "The answer is four." + END),
        (False, "\n"),
    ]


def test_multi_turn_chat_every_assistant_turn_has_loss(tiny_tokenizer: Any) -> None:
    ex = tokenize_record(MULTI, tiny_tokenizer, 256)
    system = f"<|im_start|>system\nYou are a helpful assistant.{END}\n"
    assert runs(tiny_tokenizer, ex) == [
        (False, system + user("Translate hello world") + ASSISTANT),
        (True, "hei verden" + END),
        (False, "\n" + user("What is two plus two?") + ASSISTANT),
        (True, "four" + END),
        (False, "\n"),
    ]


def test_leading_assistant_greeting_is_context(tiny_tokenizer: Any) -> None:
    greeting = {"role": "assistant", "content": "hei verden"}
    record = {"messages": [greeting, *CHAT["messages"]]}
    ex = tokenize_record(record, tiny_tokenizer, 256)
    assert [text for loss, text in runs(tiny_tokenizer, ex) if loss] == [
        "The answer is four." + END
    ]


def test_prompt_completion_mask(tiny_tokenizer: Any) -> None:
    ex = tokenize_record(PC, tiny_tokenizer, 256)
    assert runs(tiny_tokenizer, ex) == [
        (False, user("Translate hello world") + ASSISTANT),
        (True, "hei verden" + END),
        (False, "\n"),
    ]


def test_alpaca_mask(tiny_tokenizer: Any) -> None:
    ex = tokenize_record(ALPACA, tiny_tokenizer, 256)
    prompt = user("Summarize the text below.\n\nThe quick brown fox jumps over the lazy dog.")
    assert runs(tiny_tokenizer, ex) == [
        (False, prompt + ASSISTANT),
        (True, "A fox jumps." + END),
        (False, "\n"),
    ]
    ex = tokenize_record(ALPACA_NO_INPUT, tiny_tokenizer, 256)
    assert runs(tiny_tokenizer, ex)[0] == (False, user("Translate hello world") + ASSISTANT)


def test_text_has_loss_everywhere_and_eos(tiny_tokenizer: Any) -> None:
    ex = tokenize_record(TEXT, tiny_tokenizer, 256)
    assert runs(tiny_tokenizer, ex) == [(True, TEXT["text"] + END)]


@pytest.mark.parametrize("record", [CHAT, MULTI, PC, ALPACA])
def test_train_on_prompt_puts_loss_on_every_token(tiny_tokenizer: Any, record: Any) -> None:
    ex = tokenize_record(record, tiny_tokenizer, 256, train_on_prompt=True)
    masked = tokenize_record(record, tiny_tokenizer, 256)
    assert ex["input_ids"] == masked["input_ids"]
    assert ex["labels"] == ex["input_ids"]
    assert runs(tiny_tokenizer, ex) == [
        (True, "".join(text for _, text in runs(tiny_tokenizer, masked)))
    ]


def test_no_offsets_path_matches(tiny_tokenizer: Any) -> None:
    class NoOffsets:
        """A tokenizer without offset mappings (as slow tokenizers are)."""

        is_fast = False

        def __getattr__(self, name: str) -> Any:
            return getattr(tiny_tokenizer, name)

        def __call__(self, text: str, **kwargs: Any) -> Any:
            assert "return_offsets_mapping" not in kwargs
            return tiny_tokenizer(text, **kwargs)

    for record in (CHAT, MULTI, PC, ALPACA, TEXT):
        assert tokenize_record(record, NoOffsets(), 256) == tokenize_record(
            record, tiny_tokenizer, 256
        )


def test_no_chat_template_fallback(tiny_tokenizer: Any) -> None:
    tiny_tokenizer.chat_template = None
    assert runs(tiny_tokenizer, tokenize_record(PC, tiny_tokenizer, 256)) == [
        (False, PC["prompt"]),
        (True, PC["completion"] + END),
    ]
    prompt = ALPACA_PROMPT.format(**ALPACA)
    assert runs(tiny_tokenizer, tokenize_record(ALPACA, tiny_tokenizer, 256)) == [
        (False, prompt),
        (True, ALPACA["output"] + END),
    ]
    prompt = ALPACA_PROMPT_NO_INPUT.format(**ALPACA_NO_INPUT)
    assert runs(tiny_tokenizer, tokenize_record(ALPACA_NO_INPUT, tiny_tokenizer, 256))[0] == (
        False,
        prompt,
    )
    assert tiny_tokenizer.decode(prompt_ids(ALPACA_NO_INPUT, tiny_tokenizer)) == prompt
    with pytest.raises(DataError) as err:
        tokenize_record(CHAT, tiny_tokenizer, 256)
    assert "'tiny-chatml' has no chat template; chat (\"messages\") data needs one" in str(
        err.value
    )


def test_not_prefix_stable_template_trains_final_answer(tiny_tokenizer: Any) -> None:
    # Earlier assistant turns are rewritten once a later turn exists (as reasoning templates do).
    tiny_tokenizer.chat_template = (
        "{% for m in messages %}{% set c = m['content'] %}"
        "{% if m['role'] == 'assistant' and not loop.last %}{% set c = '...' %}{% endif %}"
        "{{ '<|im_start|>' + m['role'] + '\n' + c + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    ex = tokenize_record(MULTI, tiny_tokenizer, 256)
    assert [text for loss, text in runs(tiny_tokenizer, ex) if loss] == ["four" + END]
    assert "<|im_start|>assistant\n...<|im_end|>" in tiny_tokenizer.decode(ex["input_ids"])


def test_generation_prompt_not_in_render_uses_prompt_plus_answer(tiny_tokenizer: Any) -> None:
    tiny_tokenizer.chat_template = (
        "{% for m in messages %}{{ '<' + m['role'] + '>' + m['content'] + '<|im_end|>' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>' }}{% endif %}"
    )
    ex = tokenize_record(PC, tiny_tokenizer, 256)
    assert runs(tiny_tokenizer, ex) == [
        (False, "<user>Translate hello world<|im_end|><|im_start|>"),
        (True, "hei verden" + END),
    ]


# --- evaluation helpers ------------------------------------------------------------------------


@pytest.mark.parametrize("record", [CHAT, MULTI, PC, ALPACA])
def test_prompt_ids_is_the_masked_prefix(tiny_tokenizer: Any, record: Any) -> None:
    ids = prompt_ids(record, tiny_tokenizer)
    ex = tokenize_record(record, tiny_tokenizer, 256)
    assert ex["input_ids"][: len(ids)] == ids
    assert tiny_tokenizer.decode(ids).endswith(ASSISTANT)
    answer = tiny_tokenizer.decode(ex["input_ids"][len(ids) :])
    assert answer.startswith(reference_answer(record) + END)


def test_reference_answer() -> None:
    assert reference_answer(MULTI) == "four"
    assert reference_answer(PC) == "hei verden"
    assert reference_answer(ALPACA) == "A fox jumps."
    with pytest.raises(DataError, match="no answer"):
        reference_answer(TEXT)


# --- truncation and all-masked examples --------------------------------------------------------


def test_truncation_and_all_masked_counts(tmp_path: Path, tiny_tokenizer: Any) -> None:
    long_prompt = {"prompt": "hei verden " * 40, "completion": "four"}
    long_answer = {"prompt": "hi", "completion": "hei verden " * 40}
    path = write(tmp_path, "jsonl", [PC, long_prompt, long_answer])
    ds = build_dataset(path, tiny_tokenizer, max_length=32)
    stats = ds.stats
    assert (stats.n_rows, stats.n_truncated, stats.n_all_masked, stats.n_examples) == (3, 2, 1, 2)
    assert len(ds) == 2
    assert ds.lengths[1] == 32
    assert ds[0] == tokenize_record(PC, tiny_tokenizer, 32)
    assert "2 truncated to 32 tokens" in stats.summary()
    assert "1 with no answer tokens left" in stats.summary()


def test_all_masked_by_truncation_raises_with_template_and_example(
    tmp_path: Path, tiny_tokenizer: Any
) -> None:
    path = write(tmp_path, "jsonl", [{"prompt": "hei verden " * 40, "completion": "four"}] * 2)
    with pytest.raises(DataError) as err:
        build_dataset(path, tiny_tokenizer, max_length=16)
    msg = str(err.value)
    assert "all 2 examples have no answer tokens" in msg
    assert "chat template of tokenizer 'tiny-chatml'" in msg
    assert "max_length=16" in msg
    assert "raise data.max_length, --data.max_length on the command line" in msg
    shown = msg.split(f"Example as tokenized ({path}, line 1, 16 tokens kept (cut here by ")[1]
    kept = tiny_tokenizer.decode(tiny_tokenizer(user("hei verden " * 40))["input_ids"][:16])
    assert shown == f"max_length)):\n{kept}"  # what training sees, not the whole example


def test_all_masked_by_template_mismatch_raises(tmp_path: Path, tiny_tokenizer: Any) -> None:
    # A template that never renders assistant turns: nothing can carry loss.
    tiny_tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'assistant' %}"
        "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
        "{% endif %}{% endfor %}"
    )
    path = write(tmp_path, "jsonl", [CHAT, MULTI])
    with pytest.raises(DataError, match="chat template of tokenizer 'tiny-chatml'") as err:
        build_dataset(path, tiny_tokenizer)
    assert user("What is two plus two?") in str(err.value)


# --- bad rows ----------------------------------------------------------------------------------

BAD_JSONL = [
    ("{not json", "invalid JSON"),
    (json.dumps({"prompt": "hi"}), 'missing field "completion" (expected a string)'),
    (
        json.dumps({"prompt": "hi", "completion": 3}),
        'expected "completion" to be a string, got a number',
    ),
    (json.dumps(["prompt", "completion"]), "expected a JSON object, got a list"),
]


@pytest.mark.parametrize(("line", "expected"), BAD_JSONL)
def test_bad_jsonl_line(tmp_path: Path, line: str, expected: str) -> None:
    path = write_lines(tmp_path, [json.dumps(PC), "", json.dumps(PC2), line, json.dumps(PC)])
    with pytest.raises(DataError) as err:
        load_records(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}, line 4: ")
    assert expected in msg
    assert "--skip-bad-rows" in msg
    records, stats = load_records(path, skip_bad_rows=True)
    assert records == [PC, PC2, PC]
    assert (stats.n_rows, stats.n_bad_rows) == (4, 1)


BAD_CHAT = [
    ({"messages": "hello"}, 'expected "messages" to be a list of {"role": str, "content": str}'),
    ({"messages": []}, "got an empty list"),
    ({"messages": ["hi"]}, "expected messages[0] to be an object, got a string"),
    (
        {"messages": [{"role": 1, "content": "hi"}]},
        'messages[0]["role"] to be a string, got a number',
    ),
    ({"messages": [{"role": "user"}]}, 'messages[0]["content"] to be a string, got nothing'),
    (
        {"messages": [{"role": "user", "content": "hi"}]},
        'at least one message with role "assistant"',
    ),
    ({"text": "hi"}, 'missing field "messages"'),
]


@pytest.mark.parametrize(("row", "expected"), BAD_CHAT)
def test_bad_chat_row(tmp_path: Path, row: Any, expected: str) -> None:
    path = write(tmp_path, "jsonl", [CHAT, CHAT, row])
    with pytest.raises(DataError, match=r"data\.jsonl, line 3: ") as err:
        load_records(path)
    assert expected in str(err.value)


@pytest.mark.parametrize(
    ("kind", "where"),
    [("csv", "row 2 (line 3)"), ("parquet", "row 2"), ("disk", "row 2"), ("json", "line 6")],
)
def test_bad_row_location_per_source(tmp_path: Path, kind: str, where: str) -> None:
    rows = [PC, {"prompt": "hi", "completion": None}, PC2]
    path = write(tmp_path, kind, rows)
    if kind == "csv":  # a CSV cell is always text; drop the cell instead
        path.write_text("prompt,completion\nhi,there\nhi\nyes,no\n")
    with pytest.raises(DataError) as err:
        load_records(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}, {where}: ")
    assert "completion" in msg
    assert "--skip-bad-rows" in msg
    records, stats = load_records(path, skip_bad_rows=True)
    assert (len(records), stats.n_rows, stats.n_bad_rows) == (2, 3, 1)


def test_csv_bad_messages_cell(tmp_path: Path) -> None:
    path = tmp_path / "chat.csv"
    good = json.dumps(CHAT["messages"]).replace('"', '""')
    path.write_text(f'messages\n"[{{""role"": ""user""}}"\n"{good}"\nhello\n')
    with pytest.raises(DataError, match=r"chat\.csv, row 1 \(line 2\): invalid JSON"):
        load_records(path)
    records, stats = load_records(path, skip_bad_rows=True)
    assert records == [CHAT]
    assert (stats.n_rows, stats.n_bad_rows) == (3, 2)


def test_broken_json_list_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    path.write_text('[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": "a",, }\n]\n')
    with pytest.raises(DataError, match=r"data\.json, line 3, column 18: invalid JSON"):
        load_records(path, skip_bad_rows=True)  # cannot resynchronize inside a JSON list


def test_skip_bad_rows_counts_in_dataset_stats(tmp_path: Path, tiny_tokenizer: Any) -> None:
    path = write_lines(
        tmp_path, [json.dumps(CHAT), "{", json.dumps({"messages": 1}), json.dumps(MULTI)]
    )
    ds = build_dataset(path, tiny_tokenizer, skip_bad_rows=True)
    assert (ds.stats.n_rows, ds.stats.n_bad_rows, len(ds)) == (4, 2, 2)
    assert "2 bad rows skipped" in ds.stats.summary()
    with pytest.raises(DataError, match="line 2"):
        build_dataset(path, tiny_tokenizer)


def test_template_error_is_a_bad_row(tmp_path: Path, tiny_tokenizer: Any) -> None:
    tiny_tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('system messages are not supported') }}{% endif %}"
        "{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    path = write(tmp_path, "jsonl", [CHAT, MULTI])
    with pytest.raises(DataError, match=r"line 2: .*system messages are not supported"):
        build_dataset(path, tiny_tokenizer)
    ds = build_dataset(path, tiny_tokenizer, skip_bad_rows=True)
    assert (len(ds), ds.stats.n_bad_rows) == (1, 1)


# --- batching ----------------------------------------------------------------------------------


def test_collate_pads_right_and_masks_padding() -> None:
    batch = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
        {"input_ids": [8], "labels": [8]},
    ]
    out = collate(batch, pad_token_id=0)
    assert torch.equal(out["input_ids"], torch.tensor([[5, 6, 7], [8, 0, 0]]))
    assert torch.equal(out["attention_mask"], torch.tensor([[1, 1, 1], [1, 0, 0]]))
    assert torch.equal(out["labels"], torch.tensor([[-100, 6, 7], [8, -100, -100]]))
    assert out["input_ids"].dtype == torch.long
    padded = collate(batch, pad_token_id=9, pad_to_multiple_of=4)
    assert padded["input_ids"].tolist() == [[5, 6, 7, 9], [8, 9, 9, 9]]
    assert padded["labels"][:, 3].tolist() == [IGNORE_INDEX, IGNORE_INDEX]
    assert "labels" not in collate([{"input_ids": [1]}], pad_token_id=0)


def test_dataloader_with_length_grouped_batches(tmp_path: Path, tiny_tokenizer: Any) -> None:
    rows = [{"prompt": "hi " * n, "completion": "hei verden"} for n in range(1, 24)]
    ds = build_dataset(write(tmp_path, "jsonl", rows), tiny_tokenizer)
    assert ds.pad_token_id == tiny_tokenizer.pad_token_id
    sampler = LengthGroupedBatchSampler(ds.lengths, batch_size=4, seed=1, group_batches=2)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 6
    assert sorted(i for b in batches for i in b) == list(range(len(ds)))
    assert max(ds.lengths) in [ds.lengths[i] for i in batches[0]]
    sampler.set_epoch(1)
    assert list(sampler) != batches
    sampler.set_epoch(0)
    assert list(sampler) == batches

    loader = DataLoader(
        ds,
        batch_sampler=LengthGroupedBatchSampler(ds.lengths, batch_size=4, shuffle=False),
        collate_fn=lambda b: collate(b, ds.pad_token_id),
    )
    seen = 0
    for batch in loader:
        lengths = batch["attention_mask"].sum(1)
        assert lengths.tolist() == sorted(lengths.tolist(), reverse=True)
        assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
        seen += len(lengths)
    assert seen == len(ds)
    dropped = LengthGroupedBatchSampler(ds.lengths, batch_size=4, drop_last=True)
    assert len(list(dropped)) == len(dropped) == 5


# --- the real SmolLM2 tokenizer ------------------------


@pytest.mark.slow
def test_smollm2_chat_template_mask(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from tilpass.pretrained import DEFAULT_MODEL, resolve_model_path

    # Converts the shipped GGUF once if this machine has not yet (about 25 s), else reads the
    # cache: the real tokenizer is what this test is about, so it never skips.
    tok = AutoTokenizer.from_pretrained(str(resolve_model_path(DEFAULT_MODEL)))
    assert tok.chat_template
    ds = build_dataset(write(tmp_path, "jsonl", [CHAT, MULTI]), tok, max_length=512)
    assert ds.stats.n_template_fallback == 0 and ds.stats.n_all_masked == 0
    loss_runs = [text for loss, text in runs(tok, ds[1]) if loss]
    end = tok.decode(tok("<|im_end|>", add_special_tokens=False)["input_ids"])
    assert loss_runs == ["hei verden" + end, "four" + end]
    ids = prompt_ids(MULTI, tok)
    assert ds[1]["input_ids"][: len(ids)] == ids


def test_bad_rows_name_the_column_and_empty_answers_and_real_flags(tmp_path: Path) -> None:
    path = tmp_path / "columns.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "é", "completion": "b",}\n')
    with pytest.raises(DataError, match=r"line 2: invalid JSON \(.* at column 35\)"):
        load_records(path)  # columns count characters: "é" is one
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": " "}\n')
    with pytest.raises(DataError, match=r'line 2: "completion" is empty.*--skip-bad-rows'):
        load_records(path)
    path.write_text('{"instruction": "a", "output": ""}\n')
    with pytest.raises(DataError, match='"output" is empty'):
        load_records(path)
    chat = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]}
    path.write_text(json.dumps(chat) + "\n")
    with pytest.raises(DataError, match=r"messages\[1\] is an assistant message with empty"):
        load_records(path)
    path.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(DataError, match=r"--data\.format on the command line"):
        load_records(path)
