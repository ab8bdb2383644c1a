"""The `tilpass` command end to end, in real subprocesses, on a tiny random model."""

from __future__ import annotations

import dataclasses
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

from tests.helpers import save_tiny_model
from tilpass.cli import merge, parse_overrides
from tilpass.methods import METHODS
from tilpass.run import DataSection, build_config
from tilpass.train import TrainConfig

LABELS = ["cardiology", "dermatology", "neurology"]
WORDS = {"cardiology": "chest pain", "dermatology": "itchy rash", "neurology": "headache"}


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama + byte-level tokenizer saved as a local Hugging Face directory."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


def chat(label: str, i: int) -> dict[str, Any]:
    return {
        "messages": [
            {"role": "user", "content": f"patient {i} has {WORDS[label]}"},
            {"role": "assistant", "content": label},
        ]
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_data(tmp_path_factory.mktemp("data"))


def write_data(directory: Path) -> tuple[Path, Path]:
    """A chat training file (24 rows) and held-out file (6 rows) in `directory`."""
    train, test = directory / "train.jsonl", directory / "test.jsonl"
    train.write_text("".join(json.dumps(chat(LABELS[i % 3], i)) + "\n" for i in range(24)))
    test.write_text("".join(json.dumps(chat(LABELS[i % 3], i)) + "\n" for i in range(100, 106)))
    return train, test


ROOT = Path(__file__).parents[1]


def cli_env() -> dict[str, str]:
    """The environment the `tilpass` subprocesses get: offline, this checkout's `src` first."""
    paths = [str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(filter(None, paths))}


def tilpass(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "tilpass.cli", *args],
        cwd=cwd,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


LORA_ARGS = ["--lora.target_modules", "[q_proj, v_proj]", "--lora.r", "4"]


def common(
    model: Path, train: Path, test: Path, out: Path, steps: int = 8, lora: bool = True
) -> list[str]:
    """Arguments every run here shares (and the LoRA settings, unless `lora` is False)."""
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
        *(LORA_ARGS if lora else []),
    ]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def greedy_reply(model_dir: Path, adapter: Path | None, prompt: str, max_new_tokens: int) -> str:
    """What `tilpass generate` should print, computed in this process."""
    from tilpass import AdaptedModel, load_model

    model, tokenizer = load_model(str(model_dir))
    if adapter is not None:
        model = AdaptedModel.from_pretrained(model, adapter)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def test_train_end_to_end(tmp_path: Path, tiny_model_dir: Path, data: tuple[Path, Path]) -> None:
    train, test = data
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump({"task": "tiny triage", "training": {"save_steps": 4, "eval_steps": 4}})
    )
    out = tmp_path / "out"
    proc = tilpass(
        "train",
        str(config),
        *common(tiny_model_dir, train, test, out),
        "--lora.rank_pattern",
        "{q_proj: 6}",
        "--lora.exclude_modules",
        "[model.layers.1.self_attn.v_proj]",
        cwd=tmp_path,
    )
    assert "exact_match" in proc.stdout and "with adapter" in proc.stdout
    assert f"tilpass generate --model {tiny_model_dir} --adapter {out / 'adapter'}" in proc.stdout
    adapter = out / "adapter"
    assert {p.name for p in adapter.iterdir()} == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "README.md",
        "tilpass_record.json",
    }
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter",
        "checkpoint-4",
        "checkpoint-8",
        "config.yaml",
        "loss.png",
        "metrics.jsonl",
        "result.json",
        "run.json",
    ]  # nothing half-written or left over from the atomic writes
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["task"] == "tiny triage" and resolved["training"]["max_steps"] == 8
    assert resolved["lora"]["r"] == 4 and resolved["training"]["save_steps"] == 4
    assert resolved["lora"]["rank_pattern"] == {"q_proj": 6}
    assert build_config(resolved, "config.yaml").to_dict() == resolved  # reusable as input
    saved_config = json.loads((adapter / "adapter_config.json").read_text())
    assert saved_config["rank_pattern"] == {"q_proj": 6}
    assert saved_config["exclude_modules"] == ["model.layers.1.self_attn.v_proj"]
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "eval"] == [4, 8]
    assert all("exact_match" in e for e in events if e["event"] == "eval")
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    record = json.loads((adapter / "tilpass_record.json").read_text())
    assert record["adapter"]["method"] == "lora" and "model" not in record
    assert record["adapter"]["file"] == "adapter_model.safetensors"
    assert record["adapter"]["sha256"] == sha256(adapter / "adapter_model.safetensors")
    assert record["adapter"]["config"] == saved_config
    assert {d["path"]: d["sha256"] for d in record["data"]} == {
        str(train): sha256(train),
        str(test): sha256(test),
    }
    manifest = f"{sha256(tiny_model_dir / 'model.safetensors')}  model.safetensors\n"
    assert record["base_model"]["sha256"] == hashlib.sha256(manifest.encode()).hexdigest()
    assert record["training"]["steps"] == 8 and record["training"]["config"] == resolved
    # q_proj: 2 layers x (A 6x32 + B 32x6); v_proj: layer 0 only, A 4x32 + B 16x4 (2 kv heads)
    assert record["adapter"]["trainable_parameters"] == 2 * (6 * 32 + 32 * 6) + 4 * 32 + 16 * 4
    assert set(record["metrics"]["before"]) == {"loss", "perplexity", "exact_match"}
    assert record["metrics"]["after"]["loss"] < record["metrics"]["before"]["loss"]
    assert json.loads((out / "result.json").read_text()) == record["metrics"]
    assert record["versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    card = (adapter / "README.md").read_text()
    assert card.startswith("---\nbase_model: ") and "library_name: peft" in card
    assert "tiny triage" in card and "| loss |" in card and "| with adapter |" in card
    assert "  - `rank_pattern`: {'q_proj': 6}\n" in card and "  - `r`: 4\n" in card
    assert f'AdaptedModel.from_pretrained(base, "{adapter}")' in card
    tensors = load_file(adapter / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        **{
            f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_{ab}.weight": shape
            for i in (0, 1)
            for ab, shape in (("A", (6, 32)), ("B", (32, 6)))
        },
        "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight": (4, 32),
        "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight": (16, 4),
    }

    prompt = "patient 7 has headache"
    gen = tilpass(
        "generate",
        "--model",
        str(tiny_model_dir),
        "--adapter",
        str(adapter),
        "--max-new-tokens",
        "3",
        prompt,
        cwd=tmp_path,
    )
    assert gen.stdout.strip() == greedy_reply(tiny_model_dir, adapter, prompt, 3)
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
        env=cli_env(),
        timeout=300,
    )
    assert chat_proc.returncode == 0, chat_proc.stderr[-3000:]
    assert chat_proc.stdout.splitlines()[-1] == (
        f"assistant: {greedy_reply(tiny_model_dir, adapter, 'hello', 2)}"
    )


def test_full_fine_tuning_baseline(
    tmp_path: Path, tiny_model_dir: Path, data: tuple[Path, Path]
) -> None:
    from transformers import AutoModelForCausalLM

    train, test = data
    out = tmp_path / "full"
    proc = tilpass(
        "train",
        *common(tiny_model_dir, train, test, out, steps=2, lora=False),
        "--method",
        "full",
        cwd=tmp_path,
    )
    saved = out / "model"
    assert f"{'metric':<14}{'base model':>14}{'fine-tuned':>16}" in proc.stdout
    assert f"tilpass generate --model {saved} " in proc.stdout and "--adapter" not in proc.stdout
    assert not (out / "adapter").exists() and not [p for p in out.iterdir() if p.name[0] == "."]
    assert {"config.json", "model.safetensors", "README.md", "tilpass_record.json"} <= {
        p.name for p in saved.iterdir()
    }
    assert "adapter_config.json" not in {p.name for p in saved.iterdir()}
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["method"] == "full" and "lora" not in resolved
    record = json.loads((saved / "tilpass_record.json").read_text())
    assert "adapter" not in record
    assert record["model"]["method"] == "full fine-tuning"
    assert record["model"]["files"] == [
        {"file": "model.safetensors", "sha256": sha256(saved / "model.safetensors")}
    ]
    assert record["model"]["config"] == json.loads((saved / "config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tuned = AutoModelForCausalLM.from_pretrained(saved)
    total = sum(p.numel() for p in base.parameters())
    assert record["model"]["trainable_parameters"] == record["model"]["total_parameters"] == total
    tuned_params = dict(tuned.named_parameters())
    assert tuned_params.keys() == dict(base.named_parameters()).keys()
    changed = [n for n, p in base.named_parameters() if not torch.equal(p, tuned_params[n])]
    assert changed == [n for n, _ in base.named_parameters()]  # every weight was trained
    card = (saved / "README.md").read_text()
    assert "library_name: transformers" in card and "peft" not in card.lower()
    assert f"- changed parameters: {total:,d} of {total:,d} (all of them)" in card
    assert f'AutoModelForCausalLM.from_pretrained("{saved}")' in card
    assert "AdaptedModel" not in card and "rank" not in card and "| fine-tuned |" in card


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
    proc = subprocess.Popen(
        [sys.executable, "-m", "tilpass.cli", "train", *args, "--output_dir", str(crashed)],
        env=cli_env(),
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
    assert proc.returncode == 2 and proc.stderr.startswith(
        "tilpass train: error: command line (--training.learning_rat): training: unknown key(s) "
        "learning_rat; valid keys: "
    )
    assert "learning_rate" in proc.stderr and "Traceback" not in proc.stderr
    proc = tilpass(
        "train",
        *common(tiny_model_dir, train, test, tmp_path / "o"),
        "--lora.target_modules",
        "[q_porj]",
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 2 and "q_porj" in proc.stderr and "q_proj" in proc.stderr
    assert "Traceback" not in proc.stderr


BOOKKEEPING = {
    "task_type",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "peft_version",
    "peft_type",
    "runtime_config",  # PEFT's per-process settings, never saved, so not a train setting
}


def default_of(f: dataclasses.Field[Any]) -> Any:
    return f.default_factory() if callable(f.default_factory) else f.default


def test_train_help_lists_every_field_with_its_default(tmp_path: Path) -> None:
    out = tilpass("train", "--help", cwd=tmp_path).stdout
    listed = {}
    for line in out.splitlines():
        key, _, rest = line.strip().partition(" ")
        if line.startswith("  ") and "." in key and not key.startswith("-"):
            listed[key] = rest.strip()
    expected = {f"data.{f.name}": default_of(f) for f in dataclasses.fields(DataSection)}
    expected |= {f"training.{f.name}": default_of(f) for f in dataclasses.fields(TrainConfig)}
    for name, method in METHODS.items():
        fields = [f for f in dataclasses.fields(method.config_class) if f.name not in BOOKKEEPING]
        expected |= {f"{name}.{f.name}": default_of(f) for f in fields}
        assert f"\n{name} (used when method: {name}): {method.description}:\n" in out
    assert "lora.r" in expected and "lora.rank_pattern" in expected  # LoRA is registered
    assert listed.keys() == expected.keys()  # every field, and no bookkeeping one
    for key, default in expected.items():
        assert listed[key].startswith(repr(default)), (key, listed[key])
    assert listed["lora.lora_alpha"].startswith("8 ") and listed["lora.lora_dropout"][:4] == "0.0 "


def test_invalid_method_setting_fails_before_the_model_loads(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"lora": {"r": 0, "target_modules": ["q_proj"]}}))
    started = time.monotonic()
    proc = tilpass(
        "train",
        str(config),
        "--model",
        str(tmp_path / "no-such-model"),
        "--data.train",
        str(tmp_path / "no-such-data.jsonl"),
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr == (
        f"tilpass train: error: {config}, line 2: lora: r must be a positive integer, got 0\n"
    )
    assert not (tmp_path / "runs").exists()  # no output directory either
    assert time.monotonic() - started < 60


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
    assert config.training.learning_rate == 1e-3 and config.adapter.r == 8
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


def test_train_with_ia3_end_to_end(
    tmp_path: Path, tiny_model_dir: Path, data: tuple[Path, Path]
) -> None:
    """A second method through the same command: its section comes from IA3Config."""
    from transformers import AutoModelForCausalLM

    from tilpass import AdaptedModel

    train, test = data
    out = tmp_path / "ia3"
    tilpass(
        "train",
        *common(tiny_model_dir, train, test, out, steps=4, lora=False),
        "--method",
        "ia3",
        "--ia3.init_ia3_weights",
        "true",
        cwd=tmp_path,
    )
    adapter = out / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3"
    assert sorted(config["target_modules"]) == ["down_proj", "k_proj", "v_proj"]  # Llama default
    assert config["feedforward_modules"] == ["down_proj"]
    tensors = load_file(adapter / "adapter_model.safetensors")
    assert tensors and all(key.endswith(".ia3_l") for key in tensors)
    assert any(not torch.equal(t, torch.ones_like(t)) for t in tensors.values())  # it trained
    record = json.loads((adapter / "tilpass_record.json").read_text())
    assert record["adapter"]["config"]["peft_type"] == "IA3"
    model = AdaptedModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter
    )
    assert model.peft_config["default"].peft_type == "IA3"


def test_train_with_bottleneck_end_to_end(
    tmp_path: Path, tiny_model_dir: Path, data: tuple[Path, Path]
) -> None:
    """Bottleneck adapters through the same command: placed by the Llama slot table."""
    from transformers import AutoModelForCausalLM

    from tilpass import AdaptedModel

    train, test = data
    out = tmp_path / "bottleneck"
    tilpass(
        "train",
        *common(tiny_model_dir, train, test, out, steps=4, lora=False),
        "--method",
        "bottleneck",
        "--bottleneck.bottleneck_size",
        "8",
        cwd=tmp_path,
    )
    adapter = out / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "BOTTLENECK" and config["placement"] == "houlsby"
    tensors = load_file(adapter / "adapter_model.safetensors")
    assert {k.split(".layers.")[1].split(".", 1)[1] for k in tensors} == {
        f"{slot}.adapter_{part}.{kind}"
        for slot in ("mlp", "self_attn.o_proj")
        for part in ("down", "up")
        for kind in ("weight", "bias")
    }
    ups = [t for k, t in tensors.items() if k.endswith("adapter_up.weight")]
    assert all(t.shape[1] == 8 for t in ups) and any(bool(t.any()) for t in ups)  # it trained
    model = AdaptedModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter
    )
    assert model.peft_config["default"].peft_type == "BOTTLENECK"
