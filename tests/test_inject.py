"""Target matching: names, suffixes, regex, all-linear, exclusions, layer filters, patterns."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tilpass
from tests.helpers import lora, tiny_gpt2, tiny_llama
from tilpass.inject import find_targets


def names(model: nn.Module, **overrides: object) -> list[str]:
    return find_targets(model, lora(**overrides))


def test_exact_and_suffix_names() -> None:
    found = names(tiny_llama(), target_modules=["q_proj", "layers.1.mlp.up_proj"])
    assert found == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.mlp.up_proj",
    ]


def test_regex_string_matches_whole_name() -> None:
    found = names(tiny_llama(), target_modules=r".*\.0\.self_attn\.(q|k)_proj")
    assert found == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"]


def test_all_linear_skips_the_output_head() -> None:
    found = names(tiny_llama(), target_modules="all-linear")
    assert len(found) == 2 * 7 and not any("lm_head" in n for n in found)
    gpt2 = names(tiny_gpt2(), target_modules="all-linear")  # Conv1D counts as linear
    assert len(gpt2) == 2 * 4 and not any("lm_head" in n for n in gpt2)


def test_exclude_modules_and_layers_to_transform() -> None:
    found = names(
        tiny_llama(),
        target_modules="all-linear",
        exclude_modules=["down_proj", "o_proj"],
        layers_to_transform=[1],
        layers_pattern="layers",
    )
    assert found == [
        f"model.layers.1.{m}"
        for m in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
        )
    ]
    assert names(tiny_gpt2(), target_modules=["c_attn"], layers_to_transform=0) == [
        "transformer.h.0.attn.c_attn"
    ]


def test_entry_that_matches_nothing_lists_modules_by_kind() -> None:
    with pytest.raises(tilpass.TargetModulesError) as info:
        tilpass.get_peft_model(tiny_llama(), lora(target_modules=["q_proj", "q_porj"]))
    message = str(info.value)
    assert "'q_porj' matches no module of LlamaForCausalLM" in message
    assert (
        "Linear: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj" in message
    )
    assert "Embedding: embed_tokens" in message
    with pytest.raises(tilpass.TargetModulesError, match="matches no module"):
        tilpass.get_peft_model(tiny_llama(), lora(target_modules=r"attention\..*"))


def test_unsupported_module_and_empty_selection() -> None:
    with pytest.raises(tilpass.TargetModulesError, match=r"'model.layers.0.mlp' \(LlamaMLP\)"):
        tilpass.get_peft_model(tiny_llama(), lora(target_modules=["mlp"]))
    with pytest.raises(tilpass.TargetModulesError, match="leaves no module"):
        names(tiny_llama(), target_modules=["q_proj"], exclude_modules=["q_proj"])
    with pytest.raises(ValueError, match=r"^No modules were targeted for adaptation\. This might"):
        names(tiny_llama(), target_modules=["q_proj"], modules_to_save=["q_proj"])
    with pytest.raises(tilpass.TargetModulesError, match="target_modules is not set"):
        names(tiny_llama(), target_modules=None)


@pytest.mark.parametrize("kind", [nn.ModuleList, nn.ModuleDict, nn.ParameterList])
def test_a_container_in_modules_to_save_is_a_type_error(kind: type[nn.Module]) -> None:
    model = tiny_llama()
    model.model.extra = kind()
    before = [name for name, _ in model.named_modules()]
    with pytest.raises(TypeError, match="modules_to_save cannot be applied to modules of type"):
        tilpass.get_peft_model(model, lora(modules_to_save=["extra"]))
    assert [name for name, _ in model.named_modules()] == before


def test_failed_injection_leaves_the_model_untouched() -> None:
    model = tiny_llama()
    keys = set(model.state_dict())
    with pytest.raises(tilpass.TargetModulesError):
        tilpass.get_peft_model(model, lora(target_modules=["q_proj", "mlp"]))
    assert set(model.state_dict()) == keys


def test_rank_and_alpha_patterns() -> None:
    config = lora(
        r=8,
        lora_alpha=16,
        rank_pattern={"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 4},
        alpha_pattern={"q_proj": 2},
        use_rslora=True,
    )
    v = config.layer_spec("model.layers.0.self_attn.v_proj", True)
    q0 = config.layer_spec("model.layers.0.self_attn.q_proj", True)
    q1 = config.layer_spec("model.layers.1.self_attn.q_proj", True)
    assert (v.r, v.alpha, q0.r, q0.alpha, q1.r) == (2, 16, 8, 2, 4)
    assert v.scale == pytest.approx(16 / 2**0.5)
    model = tilpass.get_peft_model(tiny_llama(), config)
    assert model.base_model.model.layers[0].self_attn.v_proj.lora_A["default"].shape == (2, 32)


def test_plain_torch_module_works() -> None:
    """Any nn.Module: nothing in the core knows about transformers."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(5, 8)
    expected = net(x)
    model = tilpass.get_peft_model(net, lora(target_modules=["0", "2"]))
    assert not torch.allclose(model(x), expected)
    with model.disable_adapter():
        assert torch.equal(model(x), expected)
    model.eval()  # adapter_names routes rows at inference (PEFT refuses it in train mode)
    assert torch.allclose(model(x, adapter_names=["__base__"] * 5), expected)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("r", 0, "r must be a positive integer"),
        ("lora_alpha", 0, "lora_alpha must be > 0"),
        ("lora_dropout", 1.0, r"lora_dropout must be in \[0, 1\)"),
        ("init_lora_weights", "pissa_fast", "init_lora_weights must be"),
        ("rank_pattern", {"q_proj": 0}, "rank_pattern"),
    ],
)
def test_config_validation(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tilpass.LoraConfig(target_modules=["q_proj"], **{field: value})
    with pytest.raises(ValueError, match="bias must be one of"):
        tilpass.LoraConfig(target_modules=["q_proj"], bias="everything")


def test_config_json_round_trip(tmp_path: object) -> None:
    config = tilpass.LoraConfig(
        r=16,
        lora_alpha=32,
        target_modules={"v_proj", "q_proj"},
        use_rslora=True,
        rank_pattern={"q_proj": 8},
        task_type="CAUSAL_LM",
    )
    path = config.save(tmp_path)  # type: ignore[arg-type]
    import json

    data = json.loads(path.read_text())
    assert data["target_modules"] == ["q_proj", "v_proj"] and data["peft_type"] == "LORA"
    assert tilpass.LoraConfig.from_dict(data) == config
