"""Model cards and change records, for an adapter and for a fully fine-tuned model."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tilpass.card import ChangeRecord, render_card, write_card, write_record


def change(**overrides: object) -> ChangeRecord:
    values: dict = {
        "base_model": "org/base",
        "base_weights_sha256": "ab" * 32,
        "method": "lora",
        "trainable_parameters": 1_000,
        "total_parameters": 100_000,
        "config": {"peft_type": "LORA", "r": 4},
        "settings": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
        "data_files": {"train.jsonl": "cd" * 32},
        "metrics_before": {"loss": 2.5},
        "metrics_after": {"loss": 0.5},
        "steps": 12,
        "tokens": 3_456,
        "wall_time_s": 7.0,
        "task": "triage",
    }
    values.update(overrides)
    return ChangeRecord(**values)


def full_change() -> ChangeRecord:
    return change(
        method="full fine-tuning",
        full_model=True,
        trainable_parameters=100_000,
        config={"model_type": "llama", "hidden_size": 32},
        settings={},
        weights_files=["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"],
    )


def section(card: str, title: str) -> list[str]:
    """The lines of one `## title` section of a card, without blank edges."""
    lines = card.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0].strip().splitlines()
    return lines


def test_full_model_card_describes_a_full_model() -> None:
    card = render_card(full_change(), "runs/x/model")
    assert card.startswith(
        "---\nbase_model: org/base\nlibrary_name: transformers\nbase_model_relation: finetune\n"
        "tags:\n- tilpass\n- full-fine-tuning\n---\n# Full fine-tuning of org/base\n"
    )
    assert section(card, "What was changed") == [
        "- method: full fine-tuning (every weight of the base model was trained)",
        "- changed parameters: 100,000 of 100,000 (all of them)",
        f"- base weights SHA-256: `{'ab' * 32}`",
    ]
    assert section(card, "How to load")[:6] == [
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'model = AutoModelForCausalLM.from_pretrained("runs/x/model")',
        'tokenizer = AutoTokenizer.from_pretrained("runs/x/model")',
        "```",
    ]
    assert section(card, "Results (held-out split, measured before and after training)")[:3] == [
        "| metric | base model | fine-tuned |",
        "| --- | --- | --- |",
        "| loss | 2.5000 | 0.5000 |",
    ]
    for adapter_word in ("peft", "adapter", "rank", "r="):
        assert adapter_word not in card.lower(), adapter_word


def test_adapter_card_lists_the_settings_that_differ_from_the_defaults() -> None:
    card = render_card(change(), "runs/x/adapter")
    assert card.startswith(
        "---\nbase_model: org/base\nlibrary_name: peft\ntags:\n- tilpass\n- lora\n- peft\n---\n"
        "# lora adapter for org/base\n"
    )
    assert section(card, "What was adapted") == [
        "- method: lora (PEFT type LORA)",
        "- settings other than lora's defaults:",
        "  - `r`: 4",
        "  - `target_modules`: ['q_proj', 'v_proj']",
        "- trainable parameters: 1,000 of 100,000 (1.0000%); the base model's weights are "
        "unchanged",
        f"- base weights SHA-256: `{'ab' * 32}`",
    ]
    assert 'model = AdaptedModel.from_pretrained(base, "runs/x/adapter")' in card
    assert "| metric | base model | with adapter |" in card
    defaults = render_card(change(settings={}), "a")
    assert section(defaults, "What was adapted")[1] == "- settings: all of lora's defaults"


def test_write_card_names_the_final_location_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    path = write_card(tmp_path, full_change(), location="runs/final/model")
    assert path == tmp_path / "README.md"
    assert [p.name for p in tmp_path.iterdir()] == ["README.md"]
    assert path.read_text() == render_card(full_change(), "runs/final/model")
    write_card(tmp_path, change())
    assert f'AdaptedModel.from_pretrained(base, "{tmp_path}")' in path.read_text()


def test_record_of_a_full_model_hashes_every_weight_file(tmp_path: Path) -> None:
    record_change = full_change()
    for i, name in enumerate(record_change.weights_files):
        (tmp_path / name).write_bytes(bytes([i]) * 10)
    record = json.loads(write_record(tmp_path, record_change).read_text())
    assert "adapter" not in record
    assert record["model"] == {
        "method": "full fine-tuning",
        "files": [
            {"file": name, "sha256": hashlib.sha256(bytes([i]) * 10).hexdigest()}
            for i, name in enumerate(record_change.weights_files)
        ],
        "config": {"model_type": "llama", "hidden_size": 32},
        "trainable_parameters": 100_000,
        "total_parameters": 100_000,
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        *record_change.weights_files,
        "tilpass_record.json",
    ]


def test_record_of_an_adapter_names_its_file_and_config(tmp_path: Path) -> None:
    (tmp_path / "adapter_model.safetensors").write_bytes(b"weights")
    record = json.loads(write_record(tmp_path, change()).read_text())
    assert "model" not in record
    assert record["adapter"] == {
        "method": "lora",
        "file": "adapter_model.safetensors",
        "sha256": hashlib.sha256(b"weights").hexdigest(),
        "config": {"peft_type": "LORA", "r": 4},
        "trainable_parameters": 1_000,
        "total_parameters": 100_000,
    }
    assert record["metrics"] == {"before": {"loss": 2.5}, "after": {"loss": 0.5}}
    assert record["data"] == [{"path": "train.jsonl", "sha256": "cd" * 32}]
