"""PEFT's public API on tilpass: state-dict functions, direct injection, weighted adapters,
safe merging, loading options, config files, layer status, and PEFT's behaviour rules.

Where PEFT has the same function, the result is compared with PEFT's on the same tensors
(whole logits tensors, adapters initialised non-zero); the rest is checked against float64
formulas or exact expectations.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from helpers import lora, tiny_llama, tokens
from torch import nn

import tilpass
from tilpass import PeftType
from tilpass.adapter_files import load_tensors

os.environ.setdefault("HF_HUB_OFFLINE", "1")
peft = pytest.importorskip("peft")

pytestmark = [
    pytest.mark.filterwarnings("ignore:adapter '.*' is .* MiB:UserWarning"),
    pytest.mark.filterwarnings("ignore:LoRA rank:UserWarning"),
]


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits


def _pair(**overrides: object) -> tuple[tilpass.AdaptedModel, nn.Module]:
    """The same random adapter in tilpass and in PEFT (PEFT's tensors copied from ours)."""
    ours = tilpass.get_peft_model(tiny_llama(), lora(**overrides))
    settings = {**lora(**overrides).to_dict()}
    theirs = peft.get_peft_model(
        tiny_llama(),
        peft.LoraConfig(
            r=settings["r"],
            lora_alpha=settings["lora_alpha"],
            target_modules=settings["target_modules"],
            init_lora_weights=False,
        ),
    )
    result = peft.set_peft_model_state_dict(theirs, tilpass.get_peft_model_state_dict(ours))
    assert not result.unexpected_keys
    return ours, theirs


# -- state dicts and direct injection --------------------------------------------------------
def test_state_dict_keys_and_values_are_peft_s() -> None:
    ours, theirs = _pair()
    mine = tilpass.get_peft_model_state_dict(ours)
    reference = peft.get_peft_model_state_dict(theirs)
    assert sorted(mine) == sorted(reference)
    for key, value in reference.items():
        torch.testing.assert_close(mine[key], value, rtol=0, atol=0)
    x = tokens()
    torch.testing.assert_close(logits(ours, x), logits(theirs, x))


def test_set_state_dict_reports_missing_and_unexpected_keys() -> None:
    ours, _ = _pair()
    state = tilpass.get_peft_model_state_dict(ours)
    dropped = sorted(state)[0]
    partial = {k: v for k, v in state.items() if k != dropped}
    partial["base_model.model.nothing.lora_A.weight"] = torch.zeros(1)
    result = tilpass.set_peft_model_state_dict(ours, partial)
    assert result.missing_keys == [dropped]
    assert result.unexpected_keys == ["base_model.model.nothing.lora_A.weight"]
    wrong = {dropped: torch.zeros(3, 3)}
    with pytest.raises(ValueError, match="size mismatch"):
        tilpass.set_peft_model_state_dict(ours, wrong)


def test_inject_adapter_in_model_round_trips_through_the_state_dict() -> None:
    x = tokens()
    torch.manual_seed(0)
    model = tilpass.inject_adapter_in_model(lora(), tiny_llama())
    assert type(model).__name__ == "LlamaForCausalLM"  # no wrapper
    before = logits(model, x)
    base = logits(tiny_llama(), x)
    assert (before - base).abs().max() > 1e-3  # the adapter is applied
    state = tilpass.get_peft_model_state_dict(model)
    assert all(k.startswith("model.layers.") for k in state)  # no base_model.model. prefix
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    torch.manual_seed(1)
    fresh = tilpass.inject_adapter_in_model(lora(), tiny_llama())
    assert not tilpass.set_peft_model_state_dict(fresh, state).unexpected_keys
    torch.testing.assert_close(logits(fresh, x), before, rtol=0, atol=0)


def test_inject_twice_keeps_ids_apart() -> None:
    model = tilpass.inject_adapter_in_model(lora(), tiny_llama())
    model = tilpass.inject_adapter_in_model(lora(r=8), model, adapter_name="other")
    layer = model.model.layers[0].self_attn.q_proj
    assert sorted(layer.ids.values()) == [0, 1]
    with pytest.raises(ValueError, match="already exists"):
        tilpass.inject_adapter_in_model(lora(), model, adapter_name="other")


# -- add_weighted_adapter --------------------------------------------------------------------
def _two_adapters(model_lib: str) -> nn.Module:
    torch.manual_seed(3)
    first = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    second = dict(r=4, lora_alpha=4, target_modules=["q_proj", "o_proj"], init_lora_weights=False)
    if model_lib == "peft":
        model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**first), adapter_name="a")
        model.add_adapter("b", peft.LoraConfig(**second))
        return model
    model = tilpass.get_peft_model(tiny_llama(), tilpass.LoraConfig(**first), adapter_name="a")
    model.add_adapter("b", tilpass.LoraConfig(**second))
    return model


@pytest.mark.parametrize("combination", ["linear", "cat", "svd"])
def test_add_weighted_adapter_matches_peft(combination: str) -> None:
    theirs = _two_adapters("peft")
    ours = _two_adapters("tilpass")
    for name in ("a", "b"):
        state = peft.get_peft_model_state_dict(theirs, adapter_name=name)
        assert not tilpass.set_peft_model_state_dict(ours, state, adapter_name=name).missing_keys
    kwargs = {"combination_type": combination}
    if combination == "svd":
        kwargs["svd_rank"] = 3
    theirs.add_weighted_adapter(["a", "b"], [0.7, -1.3], "mix", **kwargs)
    ours.add_weighted_adapter(["a", "b"], [0.7, -1.3], "mix", **kwargs)
    assert ours.peft_config["mix"].r == theirs.peft_config["mix"].r
    assert sorted(ours.peft_config["mix"].target_modules) == sorted(
        theirs.peft_config["mix"].target_modules
    )
    assert not any(p.requires_grad for p in ours.adapter_parameters("mix"))
    theirs.set_adapter("mix")
    ours.set_adapter("mix")
    x = tokens()
    torch.testing.assert_close(logits(ours, x), logits(theirs, x), atol=1e-5, rtol=1e-5)


def test_cat_combination_is_the_exact_weighted_sum() -> None:
    model = _two_adapters("tilpass")
    model.add_weighted_adapter(["a", "b"], [0.5, 2.0], "mix", combination_type="cat")
    layer = model.base_model.model.layers[0].self_attn.q_proj
    expected = torch.zeros(32, 32, dtype=torch.float64)
    for name, weight in (("a", 0.5), ("b", 2.0)):
        a, b = layer.lora_A[name].double(), layer.lora_B[name].double()
        expected += weight * layer.specs[name].scale * (b @ a)
    a, b = layer.lora_A["mix"].double(), layer.lora_B["mix"].double()
    got = layer.specs["mix"].scale * (b @ a)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def test_add_weighted_adapter_errors() -> None:
    model = _two_adapters("tilpass")
    with pytest.raises(ValueError, match="Adapter nope does not exist"):
        model.add_weighted_adapter(["a", "nope"], [1.0, 1.0], "mix")
    with pytest.raises(NotImplementedError, match=r"supported are linear, ties, .*, cat, svd"):
        model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "mix", combination_type="mean")
    model.add_adapter("r8", lora(r=8))
    with pytest.raises(ValueError, match="same r value"):
        model.add_weighted_adapter(["a", "r8"], [1.0, 1.0], "mix", combination_type="linear")
    assert "mix" not in model.peft_config


# -- merging ---------------------------------------------------------------------------------
def test_safe_merge_refuses_a_broken_adapter_and_leaves_weights_alone() -> None:
    model = tilpass.get_peft_model(tiny_llama(), lora())
    layer = model.base_model.model.layers[0].self_attn.q_proj
    weight = layer.weight.detach().clone()
    with torch.no_grad():
        layer.lora_B["default"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaNs detected in the merged weights"):
        model.merge_adapter(safe_merge=True)
    assert torch.equal(layer.weight, weight)
    assert not layer.merged
    with pytest.raises(ValueError, match="NaNs detected"):
        model.merge_and_unload(safe_merge=True)


def test_merge_and_unload_merges_the_named_adapters() -> None:
    model = tilpass.get_peft_model(tiny_llama(), lora(), adapter_name="a")
    model.add_adapter("b", lora(lora_alpha=3))
    x = tokens()
    model.set_adapter("b")
    expected = logits(model, x)
    model.set_adapter("a")
    merged = model.merge_and_unload(adapter_names=["b"])
    torch.testing.assert_close(logits(merged, x), expected, atol=1e-5, rtol=1e-5)


# -- loading and saving ----------------------------------------------------------------------
def test_loading_for_inference_switches_to_eval_and_freezes(tmp_path: Path) -> None:
    model = tilpass.get_peft_model(tiny_llama().train(), lora(lora_dropout=0.5))
    model.save_pretrained(tmp_path)
    loaded = tilpass.AdaptedModel.from_pretrained(tiny_llama().train(), tmp_path)
    assert not loaded.training and not any(m.training for m in loaded.modules())
    assert not any(p.requires_grad for p in loaded.parameters())
    x = tokens()
    assert torch.equal(logits(loaded, x), logits(loaded, x))  # no dropout
    trainable = tilpass.AdaptedModel.from_pretrained(
        tiny_llama().train(), tmp_path, is_trainable=True
    )
    assert trainable.training
    assert all(p.requires_grad for p in trainable.adapter_parameters("default"))


def test_from_pretrained_options(tmp_path: Path) -> None:
    model = tilpass.get_peft_model(tiny_llama(), lora())
    model.save_pretrained(tmp_path)
    x = tokens()
    config = tilpass.LoraConfig.from_pretrained(tmp_path)
    loaded = tilpass.AdaptedModel.from_pretrained(
        tiny_llama(), tmp_path, config=config, torch_device="cpu", low_cpu_mem_usage=True
    )
    torch.testing.assert_close(logits(loaded, x), logits(model, x), rtol=0, atol=0)
    narrower = tilpass.LoraConfig.from_pretrained(tmp_path)
    narrower.target_modules = ["q_proj"]
    with pytest.raises(tilpass.AdapterFileError, match="unexpected keys"):
        tilpass.AdaptedModel.from_pretrained(tiny_llama(), tmp_path, config=narrower)


@pytest.mark.parametrize("autocast", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_adapter_dtype(tmp_path: Path, autocast: bool, dtype: torch.dtype) -> None:
    expected = torch.float32 if autocast else dtype
    model = tilpass.get_peft_model(tiny_llama(dtype=dtype), lora(), autocast_adapter_dtype=autocast)
    model.add_adapter("other", lora(), autocast_adapter_dtype=autocast)
    for name in ("default", "other"):
        assert {p.dtype for p in model.adapter_parameters(name)} == {expected}
    x = tokens()
    assert logits(model, x).dtype == dtype  # the base's dtype comes out
    model.save_pretrained(tmp_path)
    loaded = tilpass.AdaptedModel.from_pretrained(
        tiny_llama(dtype=dtype), tmp_path, autocast_adapter_dtype=autocast
    )
    assert {p.dtype for p in loaded.adapter_parameters("default")} == {expected}
    torch.testing.assert_close(logits(loaded, x), logits(model, x), rtol=0, atol=0)


def test_save_options_card_and_pickle(tmp_path: Path) -> None:
    model = tilpass.get_peft_model(tiny_llama(), lora())
    model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert (tmp_path / "bin" / "adapter_model.bin").is_file()
    assert not (tmp_path / "bin" / "adapter_model.safetensors").exists()
    with pytest.raises(tilpass.AdapterFileError, match="pickle files are not loaded by default"):
        tilpass.AdaptedModel.from_pretrained(tiny_llama(), tmp_path / "bin")
    loaded = tilpass.AdaptedModel.from_pretrained(tiny_llama(), tmp_path / "bin", allow_pickle=True)
    x = tokens()
    torch.testing.assert_close(logits(loaded, x), logits(model, x), rtol=0, atol=0)
    card = (tmp_path / "bin" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: peft\n") and "- lora" in card
    with pytest.raises(ValueError, match="selected_adapters"):
        model.save_pretrained(tmp_path / "x", selected_adapters=["nope"])


def test_save_embedding_layers_is_read_by_peft(tmp_path: Path) -> None:
    model = tilpass.get_peft_model(tiny_llama(), lora(target_modules=["embed_tokens"]))
    with pytest.warns(UserWarning, match="save_embedding_layers"):
        model.save_pretrained(tmp_path)
    saved = load_tensors(tmp_path)
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    assert torch.equal(saved[key], model.base_model.model.embed_tokens.weight)
    model.save_pretrained(tmp_path / "none", save_embedding_layers=False)
    assert key not in load_tensors(tmp_path / "none")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    x = tokens()
    torch.testing.assert_close(logits(theirs, x), logits(model, x))


# -- configs ---------------------------------------------------------------------------------
def test_peft_type_version_and_config_files(tmp_path: Path) -> None:
    config = lora()
    assert config.peft_type == PeftType.LORA and config.peft_type == "LORA"
    assert config.peft_version == "0.21.2"
    config.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "LORA" and data["peft_version"] == "0.21.2"
    data["peft_version"] = "0.17.0"
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    loaded = tilpass.AdapterConfig.from_pretrained(tmp_path)
    assert type(loaded) is tilpass.LoraConfig and loaded.peft_version == "0.17.0"
    assert loaded.target_modules == config.target_modules
    theirs = peft.PeftConfig.from_pretrained(tmp_path)
    assert theirs.peft_type == PeftType.LORA and theirs.r == config.r
    from tilpass.methods.ia3 import IA3Config

    with pytest.raises(tilpass.AdapterFileError, match=r"LoraConfig\.from_pretrained"):
        IA3Config.from_pretrained(tmp_path)


def test_config_validation_is_peft_s() -> None:
    with pytest.raises(ValueError, match="Invalid task type: 'CAUSAL'"):
        lora(task_type="CAUSAL")
    assert lora(task_type="CAUSAL_LM").task_type == "CAUSAL_LM"
    with pytest.raises(ValueError, match="`layers_to_transform` must also be specified"):
        lora(layers_pattern="layers")
    with pytest.raises(ValueError, match="cannot be used when `target_modules` is a str"):
        lora(target_modules=".*q_proj", layers_to_transform=[0])


def test_layers_to_transform_counts_the_first_index() -> None:
    model = tilpass.get_peft_model(tiny_llama(), lora(layers_to_transform=[1]))
    assert model.targeted_module_names == [
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    ]


def test_unmatched_pattern_keys_warn() -> None:
    with pytest.warns(RuntimeWarning, match=r"rank_pattern keys did not match.*\['k_proj'\]"):
        tilpass.get_peft_model(tiny_llama(), lora(rank_pattern={"k_proj": 8, "q_proj": 4}))
    with pytest.warns(RuntimeWarning, match=r"alpha_pattern keys.*\['nope'\]"):
        tilpass.get_peft_model(tiny_llama(), lora(alpha_pattern={"nope": 2}))


def test_a_module_in_modules_to_save_is_not_adapted() -> None:
    config = lora(target_modules=["q_proj", "lm_head"], modules_to_save=["lm_head"])
    with pytest.warns(UserWarning, match="lm_head is also in modules_to_save"):
        model = tilpass.get_peft_model(tiny_llama(), config)
    assert "lm_head" not in model.targeted_module_names
    assert type(model.base_model.lm_head).__name__ == "ModulesToSave"


# -- state and training rules ----------------------------------------------------------------
def test_only_the_active_adapter_trains() -> None:
    model = tilpass.get_peft_model(tiny_llama(), lora(), adapter_name="a")
    model.add_adapter("b", lora(modules_to_save=["lm_head"]))
    grads = model.get_model_status().requires_grad
    assert grads == {"a": True, "b": False}
    model.set_adapter("b")
    assert model.get_model_status().requires_grad == {"a": False, "b": True}
    model.set_adapter("b", inference_mode=True)
    assert not any(p.requires_grad for p in model.parameters())
    model.set_requires_grad(["a", "b"])
    assert all(p.requires_grad for p in model.adapter_parameters("a"))


def test_adapter_names_are_refused_in_train_mode() -> None:
    model = tilpass.get_peft_model(tiny_llama(), lora(), adapter_name="a").train()
    x = tokens(batch=2)
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when the model is in train"):
        model(input_ids=x, adapter_names=["a", "__base__"])
    ids = torch.tensor([model.adapter_id("a"), -1])
    model(input_ids=x, adapter_ids=ids)  # tilpass's mixed-batch training path stays open
    model.eval()
    with pytest.raises(ValueError, match="non-existing adapter\\(s\\): x, y"):
        model(input_ids=x, adapter_names=["y", "x"])


def test_disabling_layers_and_nested_blocks() -> None:
    model = tilpass.get_peft_model(tiny_llama(), lora())
    x = tokens()
    base, adapted = logits(tiny_llama(), x), logits(model, x)
    assert model.has_active_enabled_adapter
    model.merge_adapter()
    model.disable_adapter_layers()
    assert not model.has_active_enabled_adapter
    torch.testing.assert_close(logits(model, x), base, atol=1e-5, rtol=1e-5)
    assert model.get_model_status().enabled is False
    model.enable_adapter_layers()
    torch.testing.assert_close(logits(model, x), adapted, atol=1e-5, rtol=1e-5)
    with model.disable_adapter():
        with model.disable_adapter():
            pass
        assert not model.has_active_enabled_adapter
        torch.testing.assert_close(logits(model, x), base, atol=1e-5, rtol=1e-5)
    assert model.has_active_enabled_adapter


def test_status_and_targeted_names() -> None:
    model = tilpass.get_peft_model(tiny_llama(), lora(modules_to_save=["lm_head"]))
    model.add_adapter("other", lora(target_modules=["q_proj"]))
    assert model.targeted_module_names == [
        f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")
    ]
    assert model.prefix == "lora_"
    layers = model.get_layer_status()
    assert [s.name for s in layers][-1] == "model.lm_head"  # PEFT's name for it
    q = layers[0]
    assert (q.available_adapters, q.active_adapters, q.enabled) == (
        ["default", "other"],
        ["default"],
        True,
    )
    assert q.requires_grad == {"default": True, "other": False}
    status = tilpass.get_model_status(model)
    assert status.peft_types == {"default": "LORA", "other": "LORA"}
    assert status.num_adapter_layers == 5 and status.merged_adapters == []
    model.merge_adapter(["other"])  # only in the q_proj layers: not merged everywhere
    assert model.get_model_status().merged_adapters == ["other"]
    assert status.trainable_params == model.get_nb_trainable_parameters()[0]
    with pytest.raises(ValueError, match="No adapter layers found"):
        tilpass.get_layer_status(tiny_llama())


def test_peft_exception_types() -> None:
    model = tilpass.get_peft_model(tiny_llama(), lora())
    with pytest.raises(ValueError, match="Adapter with name 'default' already exists"):
        model.add_adapter("default", lora())
    with pytest.raises(ValueError, match="Adapter nope does not exist; loaded adapters: default"):
        model.delete_adapter("nope")
    with pytest.raises(KeyError):  # still a KeyError for code that catches one
        model.set_adapter("nope")
    model.merge_adapter()
    msg = "Cannot delete adapter(s) ['default'] while they are merged. Please unmerge them first."
    with pytest.raises(ValueError) as info:
        model.delete_adapter("default")
    assert str(info.value) == msg
    assert "default" in model.peft_config
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.unmerge_adapter()


def test_load_result_merge_warning_and_hub_message(tmp_path: Path) -> None:
    model = tilpass.get_peft_model(tiny_llama(), lora())
    model.save_pretrained(tmp_path)
    result = model.load_adapter(tmp_path, "again")
    assert (result.missing_keys, result.unexpected_keys) == ([], [])
    model.merge_adapter()
    with pytest.warns(UserWarning, match="All adapters are already merged, nothing to do"):
        model.merge_adapter()
    saving = tilpass.get_peft_model(tiny_llama(), lora(modules_to_save=["lm_head"]))
    saving.merge_adapter()  # a modules_to_save copy folds nothing in: still "all merged"
    with pytest.warns(UserWarning, match="All adapters are already merged, nothing to do"):
        saving.merge_adapter()
    with pytest.raises(NotImplementedError, match="upload_folder"):
        model.push_to_hub("someone/adapter")
    config = tilpass.LoraConfig.from_pretrained(tmp_path)
    loaded = tilpass.AdaptedModel.from_pretrained(tiny_llama(), tmp_path, config=config)
    assert loaded.peft_config["default"] is config and config.inference_mode
