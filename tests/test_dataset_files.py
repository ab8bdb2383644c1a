"""Tests for the shipped specialty dataset and the script that generates it."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "src" / "tilpass" / "data"
SCRIPT = ROOT / "scripts" / "make_dataset.py"
SPLITS = ("train", "test")


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_dataset", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gen() -> ModuleType:
    return _load_script()


@pytest.fixture(scope="module")
def records() -> dict[str, list[dict]]:
    out = {}
    for split in SPLITS:
        with open(DATA / f"specialty_{split}.jsonl", encoding="utf-8") as f:
            out[split] = [json.loads(line) for line in f]
    return out


def _user(record: dict) -> str:
    return next(m["content"] for m in record["messages"] if m["role"] == "user")


def test_format_and_labels(records: dict[str, list[dict]], gen: ModuleType) -> None:
    assert 200 <= len(records["train"]) <= 400
    assert 50 <= len(records["test"]) <= 150
    for split in SPLITS:
        labels_seen = set()
        for record in records[split]:
            messages = record["messages"]
            roles = [m["role"] for m in messages]
            assert roles in (["system", "user", "assistant"], ["user", "assistant"])
            assert all(isinstance(m["content"], str) and m["content"] for m in messages)
            assert messages[-1]["content"] in gen.LABELS
            labels_seen.add(messages[-1]["content"])
            assert record["meta"]["seed"] == gen.SEED
        assert labels_seen == set(gen.LABELS)
    assert 8 <= len(gen.LABELS) <= 12


def test_splits_are_disjoint(records: dict[str, list[dict]], gen: ModuleType) -> None:
    train_texts = [_user(r) for r in records["train"]]
    test_texts = [_user(r) for r in records["test"]]
    assert len(set(train_texts)) == len(train_texts)
    assert len(set(test_texts)) == len(test_texts)
    assert not set(train_texts) & set(test_texts)

    train_templates = {r["meta"]["template"] for r in records["train"]}
    test_templates = {r["meta"]["template"] for r in records["test"]}
    assert not train_templates & test_templates
    assert not set(gen.TRAIN_TEMPLATES) & set(gen.TEST_TEMPLATES)


def test_held_out_wordings_never_in_train(records: dict[str, list[dict]], gen: ModuleType) -> None:
    train_blob = "\n".join(_user(r).lower() for r in records["train"])
    for label, (train_words, held_out) in gen.SYMPTOMS.items():
        assert not set(train_words) & set(held_out), label
        for wording in held_out:
            assert wording.lower() not in train_blob, (label, wording)
    # Every test example uses at least one held-out wording.
    all_held_out = [w.lower() for _, held in gen.SYMPTOMS.values() for w in held]
    for record in records["test"]:
        text = _user(record).lower()
        assert any(w in text for w in all_held_out), text


def test_script_regenerates_identical_files(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    for split in SPLITS:
        name = f"specialty_{split}.jsonl"
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), name
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "specialty_test.jsonl",
        "specialty_train.jsonl",
    ]
