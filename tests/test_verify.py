"""`tilpass record` and `tilpass verify`: hashes written for a PEFT-saved adapter, then
checked item by item; one flipped byte anywhere is found."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import peft
import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from tests.helpers import tiny_llama
from tests.test_cli import tilpass
from tilpass.adapter_files import file_sha256
from tilpass.card import RECORD_NAME, ChangeRecord, write_record
from tilpass.cli import main
from tilpass.errors import AdapterFileError, TilpassError
from tilpass.inspect_adapter import InspectError
from tilpass.pretrained import weights_sha256
from tilpass.record import create_record
from tilpass.verify import MISMATCH, OK, SKIPPED, RecordError, verify


@pytest.fixture(scope="module")
def originals(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A base model directory, an adapter saved by PEFT itself (no record) and a data file."""
    root = tmp_path_factory.mktemp("originals")
    tiny_llama().save_pretrained(root / "base")
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft.get_peft_model(tiny_llama(), config).save_pretrained(root / "adapter")
    (root / "train.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    return root


@pytest.fixture
def work(originals: Path, tmp_path: Path) -> Path:
    """A private copy of the originals (a test may damage it)."""
    shutil.copytree(originals, tmp_path, dirs_exist_ok=True)
    return tmp_path


def flip_byte(path: Path) -> None:
    """Flip the bits of one byte near the end of `path` (inside the tensor data)."""
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))


def statuses(directory: Path, **kwargs: object) -> dict[str, str]:
    return {c.item: c.status for c in verify(directory, **kwargs).checks}  # type: ignore[arg-type]


def test_record_for_a_peft_saved_adapter_then_verify(work: Path) -> None:
    adapter, base, data = work / "adapter", work / "base", work / "train.jsonl"
    with pytest.raises(RecordError, match=r"tilpass record .*adapter --base MODEL"):
        verify(adapter)
    path = create_record(adapter, str(base), [data], task="answer triage questions")
    record = json.loads(path.read_text())
    assert record["format"] == "tilpass-change-record/1"
    assert record["adapter"]["sha256"] == file_sha256(adapter / "adapter_model.safetensors")
    assert record["adapter"]["method"] == "lora"
    assert record["adapter"]["trainable_parameters"] == 2 * (4 * 32 + 32 * 4 + 4 * 32 + 16 * 4)
    assert record["base_model"]["sha256"] == weights_sha256(base)
    assert record["base_model"]["files"] == [
        {"file": "model.safetensors", "sha256": file_sha256(base / "model.safetensors")}
    ]
    assert record["data"] == [{"path": str(data), "sha256": file_sha256(data)}]
    assert "tilpass record" in record["provenance"]
    result = verify(adapter, str(base), [data])
    assert result.ok and [c.status for c in result.checks] == [OK] * 5
    assert statuses(adapter) == {
        "adapter_model.safetensors": OK,
        "adapter_config.json": OK,
        f"base model {base}": SKIPPED,
        f"data {data}": SKIPPED,
    }


@pytest.mark.parametrize("damaged", ["adapter", "base", "data"])
def test_one_flipped_byte_is_found(work: Path, damaged: str) -> None:
    adapter, base, data = work / "adapter", work / "base", work / "train.jsonl"
    create_record(adapter, str(base), [data])
    target = {
        "adapter": adapter / "adapter_model.safetensors",
        "base": base / "model.safetensors",
        "data": data,
    }[damaged]
    flip_byte(target)
    result = verify(adapter, str(base), [data])
    assert not result.ok
    bad = sorted(c.item for c in result.checks if c.status != OK)
    expected = {
        "adapter": ["adapter_model.safetensors"],
        "base": [
            f"base model {base} (all *.safetensors files, manifest hash)",
            "base weights model.safetensors",
        ],
        "data": [f"data {data}"],
    }[damaged]
    assert bad == expected
    assert all(c.status == MISMATCH for c in result.checks if c.status != OK)


def test_changed_config_and_unknown_data_do_not_match(work: Path) -> None:
    adapter, data = work / "adapter", work / "train.jsonl"
    create_record(adapter, str(work / "base"), [data])
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["lora_alpha"] = 64
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    other = work / "other.jsonl"
    other.write_text("{}\n")
    found = statuses(adapter, data=[other])
    assert found["adapter_config.json"] == MISMATCH
    assert found[f"data {other}"] == MISMATCH


def test_corrupt_or_incomplete_record_is_an_error(work: Path) -> None:
    adapter = work / "adapter"
    (adapter / RECORD_NAME).write_text('{"format": "tilpass-change-record/1", "base_')
    with pytest.raises(RecordError, match="not valid JSON"):
        verify(adapter)
    (adapter / RECORD_NAME).write_text('{"format": "something else"}')
    with pytest.raises(RecordError, match="expected 'format'"):
        verify(adapter)
    (adapter / RECORD_NAME).write_text('{"format": "tilpass-change-record/1", "data": []}')
    with pytest.raises(RecordError, match="no 'base_model' key"):
        verify(adapter)


def test_record_refuses_another_base_an_existing_record_and_a_non_adapter(work: Path) -> None:
    adapter = work / "adapter"
    other = work / "other_base"
    config = LlamaConfig(
        hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(other)
    with pytest.raises(InspectError, match=r"q_proj\.lora_A\.weight has shape \(4, 32\)"):
        create_record(adapter, str(other), [])
    assert not (adapter / RECORD_NAME).exists()
    with pytest.raises(AdapterFileError, match=r"adapter_config\.json: missing"):
        create_record(work / "base", str(work / "base"), [])
    assert not (work / "base" / RECORD_NAME).exists()
    create_record(adapter, str(work / "base"), [])
    with pytest.raises(TilpassError, match="already exists"):
        create_record(adapter, str(work / "base"), [])


def test_cli_exit_codes(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    adapter, base, data = work / "adapter", str(work / "base"), str(work / "train.jsonl")
    assert main(["verify", str(adapter)]) == 2
    assert f"create one with: tilpass record {adapter}" in capsys.readouterr().err
    assert main(["record", str(adapter), "--base", base, "--data", data]) == 0
    proc = tilpass("verify", str(adapter), "--base", base, "--data", data, cwd=work)
    assert "all 5 items checked match the record" in proc.stdout
    flip_byte(adapter / "adapter_model.safetensors")
    assert main(["verify", str(adapter), "--base", base]) == 1
    assert "MISMATCH     adapter_model.safetensors" in capsys.readouterr().out


def test_a_fully_fine_tuned_model_is_checked_file_by_file(tmp_path: Path) -> None:
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    for i, name in enumerate(names):
        (tmp_path / name).write_bytes(bytes([i]) * 64)
    change = ChangeRecord(
        base_model="org/base",
        base_weights_sha256="ab" * 32,
        method="full fine-tuning",
        trainable_parameters=10,
        total_parameters=10,
        full_model=True,
        weights_files=names,
    )
    write_record(tmp_path, change)
    assert verify(tmp_path).ok
    flip_byte(tmp_path / names[1])
    assert statuses(tmp_path)[names[1]] == MISMATCH
    assert statuses(tmp_path)[names[0]] == OK
