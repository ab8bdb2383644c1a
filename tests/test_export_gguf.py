"""`tilpass export-gguf`: a tiny random Llama with a LoRA merged in, written as GGUF and read
back by `transformers`: the logits within the type's tolerance, the tokenizer identical, and
the q / k row order shown to matter."""

from __future__ import annotations

import json
import os
from pathlib import Path

import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import tilpass
from tilpass import gguf_export
from tilpass.cli import main as cli_main
from tilpass.gguf_export import GgufExportError, reload_logits, write_gguf

os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytestmark = [pytest.mark.filterwarnings("ignore:adapter '.*' is .* MiB:UserWarning")]
TEXT = "patient 3 has a headache"


@pytest.fixture(scope="module")
def model_and_adapter(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from tests.test_cli import save_tiny_model

    root = tmp_path_factory.mktemp("gguf")
    model_dir = save_tiny_model(root / "model")
    torch.manual_seed(5)
    config = tilpass.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "down_proj"], init_lora_weights=False
    )
    adapted = tilpass.get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config)
    adapted.save_pretrained(root / "adapter")
    return model_dir, root / "adapter"


def _relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).abs().max() / expected.abs().max())


def test_cli_round_trip_through_transformers(
    model_and_adapter: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir, adapter = model_and_adapter
    out = tmp_path / "tiny.gguf"
    args = ["export-gguf", "--model", str(model_dir), "--adapter", str(adapter), "--out", str(out)]
    assert cli_main(args) == 0, capsys.readouterr().err
    assert "self-check" in capsys.readouterr().out
    reader = gguf.GGUFReader(str(out))
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "blk.1.attn_q.weight", "output_norm.weight"} <= names
    assert "output.weight" not in names  # tied embeddings, as in the default model
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    merged = tilpass.AdaptedModel.from_pretrained(base, adapter).merge_and_unload()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name)
    with torch.no_grad():
        expected, got = merged(ids).logits, reloaded(ids).logits
        assert _relative(got, expected) < 1e-3 < gguf_export.TOLERANCE["f16"]
        assert _relative(AutoModelForCausalLM.from_pretrained(model_dir)(ids).logits, got) > 0.05
    read_back = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    assert read_back(TEXT).input_ids == tokenizer(TEXT).input_ids
    assert read_back.eos_token == tokenizer.eos_token

    assert cli_main(args) == 2  # --out exists: refused
    assert "already exists" in capsys.readouterr().err
    bad = [*args[:3], "--adapter", str(tmp_path), "--out", str(tmp_path / "no.gguf")]
    assert cli_main(bad) == 2 and "not an adapter directory" in capsys.readouterr().err
    assert not (tmp_path / "no.gguf").exists()


def test_q8_0_untied_and_the_rope_row_order(
    model_and_adapter: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir, _ = model_and_adapter
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = LlamaConfig.from_pretrained(model_dir, tie_word_embeddings=False)
    torch.manual_seed(6)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # sharp attention, so that scrambled q / k rows show in the logits
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(10)
            layer.self_attn.k_proj.weight.mul_(10)
    ids = [tokenizer(TEXT, return_tensors="pt").input_ids]
    with torch.no_grad():
        expected = model(ids[0]).logits
    write_gguf(model, tokenizer, tmp_path / "q8.gguf", "q8_0", "tiny")
    assert "output.weight" in {t.name for t in gguf.GGUFReader(str(tmp_path / "q8.gguf")).tensors}
    (got,) = reload_logits(tmp_path / "q8.gguf", ids)
    assert _relative(got, expected) < 2e-2 < gguf_export.TOLERANCE["q8_0"]
    # without llama.cpp's row order for q and k, transformers' reader scrambles attention
    monkeypatch.setattr(gguf_export, "interleave_rope_rows", lambda weight, heads: weight)
    write_gguf(model, tokenizer, tmp_path / "plain.gguf", "f16", "tiny")
    (scrambled,) = reload_logits(tmp_path / "plain.gguf", ids)
    assert _relative(scrambled, expected) > 0.2


def test_an_adapter_for_another_base_is_refused_unless_allowed(
    model_and_adapter: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir, adapter = model_and_adapter
    other = tmp_path / "other-adapter"
    other.mkdir()
    for item in adapter.iterdir():
        (other / item.name).write_bytes(item.read_bytes())
    (other / "tilpass_record.json").unlink(missing_ok=True)
    config = json.loads((other / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "someone/another-model"
    (other / "adapter_config.json").write_text(json.dumps(config))
    out = tmp_path / "x.gguf"
    args = ["export-gguf", "--model", str(model_dir), "--adapter", str(other), "--out", str(out)]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "names base model someone/another-model" in err and "--allow-other-base" in err
    assert list(tmp_path.glob("*.gguf")) == [] and list(tmp_path.glob(".x*")) == []


def test_refuses_what_the_llama_layout_cannot_hold() -> None:
    from helpers import tiny_gpt2

    with pytest.raises(GgufExportError, match="model_type is 'gpt2'"):
        gguf_export.check_llama(tiny_gpt2().config)
