"""QLoRA end to end: training over a 4-bit base, the adapter in PEFT, merging, memory, the CLI.

Tiny random models built from configs (nothing downloaded); CLI cases run the real `tilpass`
command in a subprocess.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests import helpers
from tests.test_cli import common, tilpass
from tests.test_train import cfg, collate, events, make_items
from tilpass import AdaptedModel, LoraConfig, get_peft_model, load_model
from tilpass.memory import MemoryOptions, estimate
from tilpass.quantize import measure_storage, quantize_model
from tilpass.run import RunConfigError, build_config
from tilpass.train import train

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.filterwarnings("ignore:adapter '.*' is .* MiB:UserWarning")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with tied embeddings and a byte-level tokenizer, as a local directory."""
    return helpers.save_tiny_model(tmp_path_factory.mktemp("qlora-model"), hidden_size=64)


def random_adapter(model: AdaptedModel, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def test_short_run_over_4bit_base_trains_only_the_adapter(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = helpers.tiny_llama(vocab_size=48).train()
    quantize_model(base)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    states = {
        n: p.quant_state.absmax.clone()
        for n, p in model.named_parameters()
        if getattr(p, "quant_state", None) is not None
    }
    assert len(states) == 14
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    config = cfg(max_steps=12, gradient_checkpointing=True, learning_rate=2e-2)
    train(model, make_items(), None, collate, config, tmp_path)
    assert model.get_base_model().is_activation_checkpointing
    losses = [e["loss"] for e in events(tmp_path) if e["event"] == "train"]
    assert losses[-1] < losses[0], losses
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, start[name]), f"{name} did not train"
        else:
            assert torch.equal(p, frozen[name]), f"{name} changed"
    for name, absmax in states.items():
        assert torch.equal(model.get_parameter(name).quant_state.absmax, absmax), name


def test_adapter_loads_into_peft_on_the_full_precision_base(tmp_path: Path) -> None:
    base = helpers.tiny_llama()
    quantize_model(base)
    model = get_peft_model(base, helpers.lora(target_modules="all-linear"))
    random_adapter(model)
    model.save_pretrained(tmp_path / "adapter")
    peft_model = peft.PeftModel.from_pretrained(helpers.tiny_llama(), tmp_path / "adapter")
    result = peft_model.load_adapter(tmp_path / "adapter", adapter_name="again")
    assert [k for k in result.missing_keys if ".lora_" in k] == []
    assert result.unexpected_keys == []
    ours = AdaptedModel.from_pretrained(helpers.tiny_llama(), tmp_path / "adapter")
    ids = helpers.tokens()
    with torch.no_grad():
        expected = peft_model(ids).logits
        torch.testing.assert_close(ours(ids).logits, expected, atol=2e-5, rtol=2e-5)
        with peft_model.disable_adapter():  # the adapter is non-zero: the check can fail
            assert not torch.allclose(peft_model(ids).logits, expected, atol=1e-3)


def test_base_storage_and_memory_estimate_match_the_measured_bytes(model_dir: Path) -> None:
    options = MemoryOptions(dtype=torch.float32)
    _, estimates = estimate(str(model_dir), ("lora", "qlora"), options)
    full, _ = load_model(str(model_dir))
    assert estimates["lora"].lines["base weights"] == measure_storage(full).total_bytes
    quantized, _ = load_model(str(model_dir), quantize="nf4")
    adapted = get_peft_model(quantized, LoraConfig(r=16, target_modules="all-linear"))
    storage = adapted.base_storage()
    assert estimates["qlora"].lines["base weights"] == storage.total_bytes
    adapter_bytes = sum(4 * p.numel() for p in adapted.parameters() if p.requires_grad)
    assert estimates["qlora"].lines["adapter weights"] == adapter_bytes
    bits = storage.bits_per_quantized_weight
    # 4.127, plus the float32 offset and rounded-up nested scale of each layer this small
    assert bits is not None and 4 + 8 / 64 + 32 / (64 * 256) < bits < 4.14
    # one shared copy of the two code books (1,088 bytes) for the whole model
    assert storage.code_book_bytes == (16 + 256) * 4


def test_memory_of_llama_2_7b_matches_published_counts() -> None:
    options = MemoryOptions(r=8, target_modules=["q_proj", "v_proj"], dtype=torch.float32)
    _, estimates = estimate("llama-2-7b", ("full", "lora"), options)
    assert estimates["lora"].lines["adapter weights"] == 4_194_304 * 4
    assert estimates["full"].lines["gradients"] == 6_738_415_616 * 4


def test_quantize_with_full_fine_tuning_is_refused() -> None:
    with pytest.raises(RunConfigError, match="cannot be combined with method: full"):
        build_config({"method": "full", "quantize": "nf4"}, "command line")
    with pytest.raises(RunConfigError, match="nf4, fp4, int8"):
        build_config({"quantize": "nf2"}, "command line")


@pytest.mark.slow
def test_train_quantized_then_merge_with_the_cli(
    tmp_path: Path, model_dir: Path, data_files: tuple[Path, Path]
) -> None:
    train_file, test_file = data_files
    out = tmp_path / "run"
    proc = tilpass(
        "train", "--quantize", "nf4", *common(model_dir, train_file, test_file, out), cwd=tmp_path
    )
    assert "base quantized to 4-bit NF4" in proc.stdout
    assert "bits per weight" in proc.stdout
    adapter = out / "adapter"
    assert "4-bit NF4" in (adapter / "README.md").read_text()
    record = json.loads((adapter / "tilpass_record.json").read_text())
    assert record["base_model"]["quantization"]["format"] == "nf4"

    merged_dir = tmp_path / "merged"
    proc = tilpass(
        "merge", "--base", str(model_dir), "--adapter", str(adapter), "--out", str(merged_dir),
        cwd=tmp_path,
    )  # fmt: skip
    assert "largest logit difference" in proc.stdout
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    base, tokenizer = load_model(str(model_dir))
    assert (merged_dir / "tokenizer.json").is_file() and tokenizer.pad_token is not None
    adapted = AdaptedModel.from_pretrained(base, adapter)
    ids = tokenizer("patient 3 has a headache", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = adapted(ids).logits
        torch.testing.assert_close(merged(ids).logits, expected, atol=1e-4, rtol=1e-4)
        with adapted.disable_adapter():
            assert not torch.allclose(adapted(ids).logits, expected, atol=1e-4)

    refused = tilpass(
        "merge", "--base", str(model_dir), "--adapter", str(adapter), "--out",
        str(tmp_path / "m4"), "--quantize", "nf4", cwd=tmp_path, check=False,
    )  # fmt: skip
    assert refused.returncode == 2 and "--requantize" in refused.stderr
    assert not (tmp_path / "m4").exists()
    forced = tilpass(
        "merge", "--base", str(model_dir), "--adapter", str(adapter), "--out",
        str(tmp_path / "m4"), "--quantize", "nf4", "--requantize", cwd=tmp_path,
    )  # fmt: skip
    assert "re-quantized" in forced.stdout and "largest logit difference" in forced.stdout
    AutoModelForCausalLM.from_pretrained(tmp_path / "m4")


def test_cli_refusals_and_memory(tmp_path: Path, model_dir: Path) -> None:
    proc = tilpass(
        "train", "--quantize", "nf4", "--method", "full", "--data.train", "x.jsonl",
        cwd=tmp_path, check=False,
    )  # fmt: skip
    assert proc.returncode == 2 and "cannot be combined with method: full" in proc.stderr
    proc = tilpass("memory", "--model", "llama-2-70b", "--r", "16", cwd=tmp_path)
    assert "llama-2-70b (68.98 B parameters)" in proc.stdout
    for word in ("full", "lora", "qlora", "base weights", "optimizer state", "total"):
        assert word in proc.stdout


@pytest.fixture(scope="module")
def data_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from tests.test_cli import LABELS, chat

    directory = tmp_path_factory.mktemp("qlora-data")
    train_file, test_file = directory / "train.jsonl", directory / "test.jsonl"
    lines = [json.dumps(chat(LABELS[i % 3], i)) for i in range(24)]
    train_file.write_text("\n".join(lines) + "\n")
    test_file.write_text("\n".join(json.dumps(chat(LABELS[i % 3], i)) for i in range(100, 106)))
    return train_file, test_file
