"""`tilpass inspect`: structure from the files, weight changes against the base, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tests.helpers import lora, tiny_llama
from tests.parity import perturb
from tests.test_cli import tilpass
from tilpass import get_peft_model
from tilpass.cli import main
from tilpass.inject import adapter_layers
from tilpass.inspect_adapter import (
    InspectError,
    describe_adapter,
    effective_rank,
    inspect_adapter,
    load_onto_base,
    weight_deltas,
)
from tilpass.methods.bottleneck import BottleneckConfig
from tilpass.methods.ia3 import IA3Config
from tilpass.methods.lora_prompt import LoraPromptConfig
from tilpass.methods.prompt import PromptTuningConfig


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama saved as a model directory (the `--base`)."""
    path = tmp_path_factory.mktemp("base")
    tiny_llama().save_pretrained(path)
    return path


def save(config: object, directory: Path, seed: int = 3) -> object:
    """An adapter with seeded non-zero tensors, saved in `directory`; returns the model."""
    model = get_peft_model(tiny_llama(), config)
    for _, layer in adapter_layers(model.base_model):
        perturb(layer.adapter_parameters("default"), seed)
    model.save_pretrained(directory)
    return model


@pytest.fixture(scope="module")
def rank_two(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An r=8 LoRA whose update has rank 2 by construction (A's last six rows are zero)."""
    path = tmp_path_factory.mktemp("rank_two")
    model = get_peft_model(tiny_llama(), lora(r=8, lora_alpha=16))
    with torch.no_grad():
        for _, layer in adapter_layers(model.base_model):
            layer.lora_a["default"][2:] = 0.0
    model.save_pretrained(path)
    return path


def test_rank_two_update_in_an_r8_adapter_reports_rank_two(rank_two: Path, base_dir: Path) -> None:
    report = inspect_adapter(rank_two, str(base_dir))
    modules = [m for m in report.modules if m.path]
    assert [m.kind for m in modules] == ["q_proj", "v_proj"] * 2
    for module in modules:
        assert module.rank == 8
        assert module.effective_rank["99%"] == 2, module
        assert 1 <= module.effective_rank["90%"] <= 2
        assert module.relative_norm is not None and module.relative_norm > 0
    assert any("r could be lowered (to about 2)" in hint for hint in report.hints)


def test_lora_delta_equals_float64_formula_and_peft_merge(rank_two: Path, base_dir: Path) -> None:
    adapted = load_onto_base(rank_two, str(base_dir))
    deltas = weight_deltas(adapted)
    assert sorted(deltas) == sorted(p for p, _ in adapter_layers(adapted.base_model))
    base = LlamaForCausalLM.from_pretrained(base_dir).eval()
    merged = peft.PeftModel.from_pretrained(base, rank_two).merge_and_unload()
    original = LlamaForCausalLM.from_pretrained(base_dir).state_dict()
    for path, layer in adapter_layers(adapted.base_model):
        a = layer.lora_a["default"].double()
        b = layer.lora_b["default"].double()
        torch.testing.assert_close(deltas[path][0], 2.0 * b @ a)  # alpha / r = 16 / 8
        theirs = merged.get_submodule(path).weight.double() - original[f"{path}.weight"].double()
        torch.testing.assert_close(deltas[path][0], theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "config",
    [lora(use_dora=True), IA3Config(target_modules=["v_proj", "down_proj"])],
    ids=["dora", "ia3"],
)
def test_dora_and_ia3_deltas_equal_peft_merge(
    config: object, base_dir: Path, tmp_path: Path
) -> None:
    save(config, tmp_path)
    deltas = weight_deltas(load_onto_base(tmp_path, str(base_dir)))
    base = LlamaForCausalLM.from_pretrained(base_dir).eval()
    merged = peft.PeftModel.from_pretrained(base, tmp_path).merge_and_unload()
    original = LlamaForCausalLM.from_pretrained(base_dir).state_dict()
    assert deltas
    for path, (delta, _) in deltas.items():
        theirs = merged.get_submodule(path).weight.double() - original[f"{path}.weight"].double()
        assert theirs.abs().max() > 1e-3  # the change is not vacuous
        torch.testing.assert_close(delta, theirs, rtol=1e-5, atol=1e-6)


def test_effective_rank_counts_energy() -> None:
    # singular values 3, 2, 1: energies 9, 4, 1 of 14, so 64% fits in one direction (9/14),
    # 90% in two (13/14 = 92.9%) and 93% needs all three.
    delta = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
    assert effective_rank(delta, 0.64) == 1
    assert effective_rank(delta, 0.90) == 2
    assert effective_rank(delta, 0.93) == 3
    assert effective_rank(torch.zeros(4, 4), 0.99) == 0


def test_whole_rank_in_use_hints_r_may_be_too_low(base_dir: Path, tmp_path: Path) -> None:
    model = get_peft_model(tiny_llama(), lora(r=4))
    with torch.no_grad():  # B A = a multiple of a rank-4 projection: four equal directions
        for _, layer in adapter_layers(model.base_model):
            a, b = layer.lora_a["default"], layer.lora_b["default"]
            a.copy_(torch.eye(*a.shape))
            b.copy_(torch.eye(*b.shape))
    model.save_pretrained(tmp_path)
    report = inspect_adapter(tmp_path, str(base_dir))
    assert {m.effective_rank["90%"] for m in report.modules} == {4}
    assert any("r may be too low" in hint for hint in report.hints)


def test_untrained_lora_plus_prompt_reports_zero_change_and_its_tokens(
    base_dir: Path, tmp_path: Path
) -> None:
    config = LoraPromptConfig(target_modules=["q_proj"], num_virtual_tokens=3)
    get_peft_model(tiny_llama(), config).save_pretrained(tmp_path)  # B = 0: no change yet
    report = inspect_adapter(tmp_path, str(base_dir))
    assert report.virtual_tokens == 3
    lora_modules = [m for m in report.modules if m.path]
    assert [m.effective_rank for m in lora_modules] == [{"90%": 0, "99%": 0}] * 2
    assert [m.relative_norm for m in lora_modules] == [0.0, 0.0]
    assert report.hints == [
        "2 of 2 modules change nothing (an untrained adapter, or one whose update is still zero)"
    ]


def test_files_alone_give_structure_of_each_method(tmp_path: Path) -> None:
    lora_model = save(lora(r=8, rank_pattern={"v_proj": 2}), tmp_path / "lora")
    report = describe_adapter(tmp_path / "lora")
    assert report.method == "lora" and report.base_checked is None
    assert [(m.layer, m.kind, m.rank) for m in report.modules] == [
        (0, "q_proj", 8),
        (0, "v_proj", 2),
        (1, "q_proj", 8),
        (1, "v_proj", 2),
    ]
    trainable = sum(p.numel() for p in lora_model.parameters() if p.requires_grad)
    assert report.trainable_parameters == trainable == 2 * (8 * 32 + 32 * 8 + 2 * 32 + 16 * 2)
    assert report.dtypes == {"F32": 8}
    assert report.file_bytes == (tmp_path / "lora" / "adapter_model.safetensors").stat().st_size

    save(BottleneckConfig(bottleneck_size=4), tmp_path / "bottleneck")
    bottleneck = describe_adapter(tmp_path / "bottleneck")
    assert {(m.kind, m.width) for m in bottleneck.modules} == {("o_proj", 4), ("mlp", 4)}

    save(PromptTuningConfig(num_virtual_tokens=5), tmp_path / "prompt")
    prompt = describe_adapter(tmp_path / "prompt")
    assert prompt.virtual_tokens == 5 and prompt.trainable_parameters == 5 * 32
    assert [(m.path, m.kind) for m in prompt.modules] == [("", "input")]


def test_not_an_adapter_and_another_base_are_refused(base_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    with pytest.raises(InspectError, match=r"no adapter_model\.safetensors"):
        describe_adapter(tmp_path / "notes")
    save(lora(), tmp_path / "adapter")
    other = tmp_path / "other_base"
    config = LlamaConfig(
        hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(other)
    with pytest.raises(
        InspectError, match=r"q_proj\.lora_A\.weight has shape \(4, 32\).*\(4, 48\)"
    ):
        inspect_adapter(tmp_path / "adapter", str(other))


def test_cli_json_and_plot(
    rank_two: Path, base_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    proc = tilpass("inspect", str(rank_two), "--json", cwd=tmp_path)  # a real subprocess
    report = json.loads(proc.stdout)
    assert report["method"] == "lora" and report["base_checked"] is None
    assert [m["rank"] for m in report["modules"]] == [8, 8, 8, 8]
    plot = tmp_path / "changes.png"
    assert main(["inspect", str(rank_two), "--base", str(base_dir), "--plot", str(plot)]) == 0
    text = capsys.readouterr().out
    assert "hint: 4 of 4 modules hold 90% of their change in at most a quarter" in text
    assert plot.read_bytes().startswith(b"\x89PNG")


def test_cli_error_names_the_file_and_writes_nothing(
    base_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plot = tmp_path / "x.png"
    code = main(["inspect", str(tmp_path), "--base", str(base_dir), "--plot", str(plot)])
    assert code == 2
    err = capsys.readouterr().err
    assert "adapter_config.json: missing" in err and "Traceback" not in err
    assert not plot.exists()
    assert main(["inspect", str(tmp_path), "--plot", str(plot)]) == 2
    assert "--plot draws the weight changes, which need --base MODEL" in capsys.readouterr().err
