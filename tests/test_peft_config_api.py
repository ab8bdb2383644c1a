"""PEFT's config API on tilpass's configs: `PeftConfig`, `from_json_file`, `peft_type`, the
errors and warnings of loading a config file, compared with PEFT's own results on the same
files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import tilpass
from tilpass import PeftType

os.environ.setdefault("HF_HUB_OFFLINE", "1")
peft = pytest.importorskip("peft")


def _written(tmp_path: Path, **extra: object) -> Path:
    """A LoRA config saved by tilpass, with `extra` keys added to its file."""
    tilpass.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]).save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **extra}))
    return path


def test_from_json_file_is_the_file_s_dict_as_peft_reads_it(tmp_path: Path) -> None:
    path = _written(tmp_path)
    ours = tilpass.LoraConfig.from_json_file(path)
    assert ours == peft.LoraConfig.from_json_file(str(path)) == json.loads(path.read_text())
    path = _written(tmp_path, runtime_config={"ephemeral_gpu_offload": True})
    with pytest.warns(UserWarning, match="contains a `runtime_config` key. This is ignored"):
        ours = tilpass.PeftConfig.from_json_file(path)
    assert "runtime_config" not in ours and ours["r"] == 4
    with pytest.raises(tilpass.AdapterFileError, match="no such config file"):
        tilpass.LoraConfig.from_json_file(tmp_path / "missing.json")


def test_peft_type_is_set_by_the_class_and_may_be_reassigned() -> None:
    config = tilpass.LoraConfig(peft_type="test")
    assert config.peft_type is PeftType.LORA and config.to_dict()["peft_type"] == "LORA"
    assert config.to_dict() == tilpass.LoraConfig().to_dict()
    config.peft_type = "LORA"  # PEFT allows a plain string here
    assert config.peft_type == PeftType.LORA
    assert "peft_type" not in repr(config)


def test_peft_config_picks_the_class_from_the_file(tmp_path: Path) -> None:
    _written(tmp_path)
    loaded = tilpass.PeftConfig.from_pretrained(tmp_path)
    assert type(loaded) is tilpass.LoraConfig and tilpass.PeftConfig is tilpass.AdapterConfig
    theirs = peft.PeftConfig.from_pretrained(tmp_path)
    assert (loaded.r, loaded.lora_alpha, loaded.peft_type) == (theirs.r, theirs.lora_alpha, "LORA")


def test_a_file_without_peft_type_is_a_type_error_as_in_peft(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text(json.dumps({"foo": "bar"}))
    message = "The LoraConfig config that is trying to be loaded is missing required keys"
    with pytest.raises(TypeError, match=message):
        peft.LoraConfig.from_pretrained(tmp_path)
    with pytest.raises(TypeError, match=message) as info:
        tilpass.LoraConfig.from_pretrained(tmp_path)
    assert isinstance(info.value, tilpass.AdapterFileError)
    assert str(tmp_path / "adapter_config.json") in str(info.value)


def test_unknown_keys_warn_once_with_peft_s_message(tmp_path: Path) -> None:
    _written(tmp_path, foobar="baz", spam=123)
    start = (
        "Unexpected keyword arguments ['foobar', 'spam'] for class LoraConfig, these are ignored"
    )
    for reader in (tilpass.LoraConfig, tilpass.PeftConfig):
        with pytest.warns(UserWarning) as record:
            loaded = reader.from_pretrained(tmp_path)
        assert [str(w.message)[: len(start)] for w in record] == [start]
        assert "foobar" not in loaded.to_dict()


@pytest.mark.parametrize("field", ["layers_to_transform", "layers_pattern"])
def test_layer_indexing_with_a_regex_names_the_field(field: str) -> None:
    value = [0] if field == "layers_to_transform" else ["layers"]
    with pytest.raises(
        ValueError, match=f"`{field}` cannot be used when `target_modules` is a str"
    ):
        tilpass.LoraConfig(target_modules=".*q_proj", **{field: value})


def test_is_prompt_learning_and_ensure_weight_tying_are_peft_s() -> None:
    assert tilpass.LoraConfig().is_prompt_learning is peft.LoraConfig().is_prompt_learning is False
    prompt = tilpass.PromptTuningConfig(num_virtual_tokens=2)
    assert prompt.is_prompt_learning is True
    config = tilpass.LoraConfig(ensure_weight_tying=False)
    assert config.to_dict()["ensure_weight_tying"] is False
    assert tilpass.LoraConfig(ensure_weight_tying=True).to_dict()["ensure_weight_tying"] is True
