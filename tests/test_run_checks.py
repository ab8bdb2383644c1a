"""Checks made before any model or data is loaded: data paths and formats, model, targets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import tiny_llama
from tilpass.config_yaml import ConfigSources
from tilpass.run_checks import check_run
from tilpass.run_config import RunConfigError, build_config


def model_dir(tmp_path: Path) -> Path:
    """A model directory holding only a `config.json` (no weights: none are read)."""
    directory = tmp_path / "model"
    directory.mkdir()
    tiny_llama().config.save_pretrained(directory)
    return directory


def check(tmp_path: Path, values: dict, flags: set | None = None) -> str:
    sources = ConfigSources(file="run.yaml", lines={("data", "eval"): 4}, overrides=flags or set())
    with pytest.raises(RunConfigError) as caught:
        check_run(build_config(values, sources), sources)
    return str(caught.value)


def test_data_files_must_exist_and_have_a_format(tmp_path: Path) -> None:
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    base = {"model": str(model_dir(tmp_path)), "lora": {"target_modules": ["q_proj"]}}
    assert check(tmp_path, base).startswith("run.yaml: data: train is not set")
    missing = {**base, "data": {"train": str(train), "eval": "gone.jsonl"}}
    assert check(tmp_path, missing) == (
        "run.yaml, line 4: data: eval: gone.jsonl: no such file or directory"
    )
    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps({"question": "q"}) + "\n")
    unknown = {**base, "data": {"train": str(train), "eval": str(odd)}}
    assert "data: eval: cannot tell the format" in check(tmp_path, unknown)
    assert "--data.format" in check(tmp_path, unknown)


def test_target_modules_are_matched_on_the_meta_device(tmp_path: Path) -> None:
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    values = {
        "model": str(model_dir(tmp_path)),  # config.json only: a weight load would fail
        "data": {"train": str(train)},
        "lora": {"target_modules": ["q_porj"]},
    }
    message = check(tmp_path, values, {("lora", "target_modules")})
    assert message.startswith(
        "command line (--lora.target_modules): lora: target_modules: Target modules ['q_porj'] "
        "not found in the base model: target_modules entry 'q_porj' matches no module of "
        "LlamaForCausalLM"
    )
    values["lora"] = {"target_modules": ["q_proj"]}
    check_run(build_config(values), ConfigSources())  # passes without any weights
    values["model"] = str(tmp_path / "nowhere")
    assert check(tmp_path, values).startswith("run.yaml: model: Unknown model")
