"""The `tilpass` command end to end, in real subprocesses, on a tiny random model."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tilpass.cli import merge, parse_overrides
from tilpass.run import build_config

LABELS = ["cardiology", "dermatology", "neurology"]
WORDS = {"cardiology": "chest pain", "dermatology": "itchy rash", "neurology": "headache"}


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama + byte-level tokenizer saved as a local Hugging Face directory."""
    from tokenizers import Tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from tests.conftest import CHATML_TEMPLATE, build_tokenizer_json

    directory = tmp_path_factory.mktemp("tiny-model")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(build_tokenizer_json()),
        eos_token="<|im_end|>",
        pad_token="<pad>",
        chat_template=CHATML_TEMPLATE,
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def chat(label: str, i: int) -> dict[str, Any]:
    return {
        "messages": [
            {"role": "user", "content": f"patient {i} has {WORDS[label]}"},
            {"role": "assistant", "content": label},
        ]
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("data")
    train, test = directory / "train.jsonl", directory / "test.jsonl"
    train.write_text("".join(json.dumps(chat(LABELS[i % 3], i)) + "\n" for i in range(24)))
    test.write_text("".join(json.dumps(chat(LABELS[i % 3], i)) + "\n" for i in range(100, 106)))
    return train, test


def tilpass(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run(
        [sys.executable, "-m", "tilpass.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def common(model: Path, train: Path, test: Path, out: Path, steps: int = 8) -> list[str]:
    return [
        "--model",
        str(model),
        "--data.train",
        str(train),
        "--data.eval",
        str(test),
        "--output_dir",
        str(out),
        "--training.max_steps",
        str(steps),
        "--training.batch_size",
        "4",
        "--training.learning_rate",
        "0.01",
        "--training.progress_bar",
        "false",
        "--training.eval_max_new_tokens",
        "4",
        "--lora.target_modules",
        "[q_proj, v_proj]",
        "--lora.r",
        "4",
    ]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_train_end_to_end(tmp_path: Path, tiny_model_dir: Path, data: tuple[Path, Path]) -> None:
    train, test = data
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump({"task": "tiny triage", "training": {"save_steps": 4, "eval_steps": 4}})
    )
    out = tmp_path / "out"
    proc = tilpass("train", str(config), *common(tiny_model_dir, train, test, out), cwd=tmp_path)
    assert "exact_match" in proc.stdout and "tilpass generate" in proc.stdout
    adapter = out / "adapter"
    assert {p.name for p in adapter.iterdir()} == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "README.md",
        "tilpass_record.json",
    }
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["task"] == "tiny triage" and resolved["training"]["max_steps"] == 8
    assert resolved["lora"]["r"] == 4 and resolved["training"]["save_steps"] == 4
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "eval"] == [4, 8]
    assert all("exact_match" in e for e in events if e["event"] == "eval")
    assert (out / "metrics.jsonl").is_file() and (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]
    record = json.loads((adapter / "tilpass_record.json").read_text())
    assert record["adapter"]["sha256"] == sha256(adapter / "adapter_model.safetensors")
    assert {d["path"]: d["sha256"] for d in record["data"]} == {
        str(train): sha256(train),
        str(test): sha256(test),
    }
    manifest = f"{sha256(tiny_model_dir / 'model.safetensors')}  model.safetensors\n"
    assert record["base_model"]["sha256"] == hashlib.sha256(manifest.encode()).hexdigest()
    assert record["training"]["steps"] == 8 and record["adapter"]["trainable_parameters"] > 0
    assert set(record["metrics"]["before"]) >= {"loss", "exact_match"}
    assert record["metrics"]["after"]["loss"] < record["metrics"]["before"]["loss"]
    assert (
        record["versions"]["torch"] == torch.__version__.split("+")[0]
        or record["versions"]["torch"]
    )
    card = (adapter / "README.md").read_text()
    assert card.startswith("---\nbase_model: ") and "library_name: peft" in card
    assert "tiny triage" in card and "| loss |" in card
    keys = load_file(adapter / "adapter_model.safetensors")
    assert len(keys) == 2 * 2 * 2 and all(
        k.startswith("base_model.model.model.layers") for k in keys
    )

    gen = tilpass(
        "generate",
        "--model",
        str(tiny_model_dir),
        "--adapter",
        str(adapter),
        "--max-new-tokens",
        "3",
        "patient 7 has headache",
        cwd=tmp_path,
    )
    assert gen.stdout.strip() != "" or gen.returncode == 0
    ev = tilpass(
        "eval",
        "--model",
        str(tiny_model_dir),
        "--adapter",
        str(adapter),
        "--data",
        str(test),
        cwd=tmp_path,
    )
    assert f"loss: {record['metrics']['after']['loss']:.4f}" in ev.stdout
    chat_proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tilpass.cli",
            "chat",
            "--model",
            str(tiny_model_dir),
            "--adapter",
            str(adapter),
            "--max-new-tokens",
            "2",
        ],
        input="hello\n\n",
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert chat_proc.returncode == 0 and "assistant:" in chat_proc.stdout


def test_full_fine_tuning_baseline(
    tmp_path: Path, tiny_model_dir: Path, data: tuple[Path, Path]
) -> None:
    train, test = data
    out = tmp_path / "full"
    tilpass(
        "train",
        *common(tiny_model_dir, train, test, out, steps=2),
        "--method",
        "full",
        "--eval_before",
        "false",
        cwd=tmp_path,
    )
    record = json.loads((out / "adapter" / "tilpass_record.json").read_text())
    assert record["adapter"]["method"] == "full fine-tuning"
    assert record["adapter"]["trainable_parameters"] == record["adapter"]["total_parameters"]


def test_killed_run_resumes_to_the_same_adapter(
    tmp_path: Path, tiny_model_dir: Path, data: tuple[Path, Path]
) -> None:
    train, test = data
    args = [
        *common(tiny_model_dir, train, test, tmp_path / "x", steps=60),
        "--training.save_steps",
        "2",
        "--training.save_total_limit",
        "0",
        "--eval_before",
        "false",
        "--lora.lora_dropout",
        "0.1",
    ]
    straight = tmp_path / "straight"
    tilpass("train", *args, "--output_dir", str(straight), cwd=tmp_path)
    crashed = tmp_path / "crashed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tilpass.cli", "train", *args, "--output_dir", str(crashed)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not (crashed / "checkpoint-4").exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (crashed / "adapter").exists()  # it really died before the end
    tilpass("train", *args, "--output_dir", str(crashed), "--resume", "auto", cwd=tmp_path)
    a = load_file(straight / "adapter" / "adapter_model.safetensors")
    b = load_file(crashed / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0)


def test_bad_data_and_bad_keys_are_clear_errors(
    tmp_path: Path, tiny_model_dir: Path, data: tuple[Path, Path]
) -> None:
    train, test = data
    bad = tmp_path / "bad.jsonl"
    bad.write_text(train.read_text().splitlines()[0] + "\n{not json\n")
    proc = tilpass(
        "train", *common(tiny_model_dir, bad, test, tmp_path / "o"), cwd=tmp_path, check=False
    )
    assert proc.returncode == 2 and "bad.jsonl" in proc.stderr and "line 2" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = tilpass(
        "train",
        *common(tiny_model_dir, train, test, tmp_path / "o"),
        "--training.learning_rat",
        "1",
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 2 and "learning_rat" in proc.stderr and "learning_rate" in proc.stderr
    proc = tilpass(
        "train",
        *common(tiny_model_dir, train, test, tmp_path / "o"),
        "--lora.target_modules",
        "[q_porj]",
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 2 and "q_porj" in proc.stderr and "q_proj" in proc.stderr


def test_train_help_lists_fields_with_defaults(tmp_path: Path) -> None:
    out = tilpass("train", "--help", cwd=tmp_path).stdout
    for key in ("training.learning_rate", "lora.r", "data.train_on_prompt", "data.max_length"):
        assert key in out
    assert "'cosine'" in out


def test_override_parsing() -> None:
    parsed = parse_overrides(
        [
            "--lora.r",
            "16",
            "--training.learning_rate=1e-3",
            "--data.train",
            "a.jsonl",
            "--lora.target_modules",
            "[q_proj, v_proj]",
            "--flag",
            "true",
        ]
    )
    assert parsed == {
        "lora": {"r": 16, "target_modules": ["q_proj", "v_proj"]},
        "training": {"learning_rate": "1e-3"},
        "data": {"train": "a.jsonl"},
        "flag": True,
    }
    config = build_config({"training": parsed["training"], "lora": {"r": "8"}})
    assert config.training.learning_rate == 1e-3 and config.lora.r == 8
    with pytest.raises(ValueError, match="training: max_steps: expected int, got 'many'"):
        build_config({"training": {"max_steps": "many"}})
    assert merge({"lora": {"r": 8, "lora_alpha": 16}}, parsed)["lora"] == {
        "r": 16,
        "lora_alpha": 16,
        "target_modules": ["q_proj", "v_proj"],
    }
    with pytest.raises(ValueError, match="needs a value"):
        parse_overrides(["--lora.r"])
    with pytest.raises(ValueError, match=r"expected --key\.sub value"):
        parse_overrides(["lora.r", "3"])
