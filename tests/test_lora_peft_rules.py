"""PEFT's rules for LoRA settings that tilpass follows, with PEFT's exception types and words
(PEFT code that checks them keeps working): target_parameters together with target_modules,
lora_bias on layers without a bias, grouped convolutions, the PiSSA / OLoRA config warning,
case-insensitive init names, and the pattern-key warning."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import tilpass


class Net(nn.Module):
    """A linear layer, an embedding and a grouped convolution."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(8, 6, bias=bias)
        self.embed = nn.Embedding(10, 8)
        self.conv2d = nn.Conv2d(4, 4, 3, groups=2, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def lora(**settings: object) -> tilpass.LoraConfig:
    return tilpass.LoraConfig(**settings)  # type: ignore[arg-type]


# -- target_parameters --------------------------------------------------------------------
@pytest.mark.parametrize("target_modules", [None, [], ""])
def test_nothing_matched_without_target_modules_is_an_error(target_modules: object) -> None:
    config = lora(target_modules=target_modules, target_parameters=["foobar.weight"])
    with pytest.raises(ValueError, match="No `target_modules` passed but also no `target_param"):
        tilpass.get_peft_model(Net(), config)


def test_target_parameters_must_be_a_list() -> None:
    with pytest.raises(TypeError, match="`target_parameters` must be a list of strings or None"):
        lora(target_parameters="linear.weight")


def test_one_side_matching_nothing_warns_and_the_other_is_adapted() -> None:
    config = lora(target_modules=["foobar"], target_parameters=["linear.weight"])
    with pytest.warns(RuntimeWarning, match=r"target_modules=\{'foobar'\} were set but no module"):
        model = tilpass.get_peft_model(Net(), config)
    assert model.targeted_module_names == []  # as in PEFT: parameter owners are not modules
    assert model.targeted_parameter_names == ["linear.weight"]
    config = lora(target_modules=["linear"], target_parameters=["foobar.weight"])
    with pytest.warns(RuntimeWarning, match=r"target_parameters=\['foobar.weight'\] were set"):
        model = tilpass.get_peft_model(Net(), config)
    assert type(model.base_model.linear).__name__ == "LoraLinear"


def test_a_module_and_its_parameter_cannot_both_be_targets() -> None:
    config = lora(target_modules=["linear"], target_parameters=["linear.weight"])
    with pytest.raises(ValueError, match=r"Trying to wrap an `nn\.Parameter` of layer 'linear' of"):
        tilpass.get_peft_model(Net(), config)
    model = tilpass.get_peft_model(Net(), lora(target_modules=["linear"]))
    with pytest.raises(ValueError, match="type Linear, which is not a valid target"):
        model.add_adapter("other", lora(target_modules=[], target_parameters=["linear.weight"]))
    assert list(model.peft_config) == ["default"]


def test_all_adapters_on_parameters_target_the_same_ones() -> None:
    on_linear = {"target_modules": [], "target_parameters": ["linear.weight"]}
    model = tilpass.get_peft_model(Net(), lora(**on_linear))
    model.add_adapter(adapter_name="same", peft_config=lora(**on_linear))
    other = lora(target_modules=[], target_parameters=["embed.weight"])
    with pytest.raises(ValueError, match="all adapters must target the same set of parameters"):
        model.add_adapter(adapter_name="other", peft_config=other)
    assert list(model.peft_config) == ["default", "same"]


# -- layer settings -----------------------------------------------------------------------
@pytest.mark.parametrize(("target", "kind"), [("linear", "Linear"), ("conv2d", "Conv2d")])
def test_lora_bias_without_a_base_bias_warns(target: str, kind: str) -> None:
    assert issubclass(tilpass.PeftWarning, UserWarning)
    expected = f"`lora_bias=True` was passed but the targeted layer of type {kind} has no bias"
    with pytest.warns(tilpass.PeftWarning, match=expected):
        tilpass.get_peft_model(Net(bias=False), lora(target_modules=[target], lora_bias=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error", tilpass.PeftWarning)
        tilpass.get_peft_model(Net(), lora(target_modules=[target], lora_bias=True))


def test_errors_in_peft_s_words() -> None:
    expected = r"Targeting a Conv2d with groups=2 and rank 3\. Currently, support is limited"
    with pytest.raises(ValueError, match=expected):
        tilpass.get_peft_model(Net(), lora(target_modules=["conv2d"], r=3))
    with pytest.raises(ValueError, match="lora_bias=True is not supported for Embedding"):
        tilpass.get_peft_model(Net(), lora(target_modules=["embed"], lora_bias=True))
    with pytest.raises(ValueError, match="DoRA does not support megatron_core"):
        lora(target_modules=["linear"], use_dora=True, megatron_config={"x": 1})


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_3", "olora"])
def test_pissa_olora_with_rslora_and_patterns_warn_once(init: str) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lora(init_lora_weights=init, use_rslora=True, rank_pattern={"linear": 8})
        lora(init_lora_weights=init, rank_pattern={"linear": 8})  # no rsLoRA: no warning
        lora(init_lora_weights=True, use_rslora=True, alpha_pattern={"linear": 8})
    assert [str(w.message)[:56] for w in caught] == [
        "Using Rank-Stabilized LoRA with rank_pattern/alpha_patte"
    ]


def test_init_names_compare_without_case_as_in_peft() -> None:
    tensors = {}
    for init in ("olora", "OLoRA"):
        config = lora(target_modules=["linear"], init_lora_weights=init, r=4)
        model = tilpass.get_peft_model(Net(), config)
        tensors[init] = model.adapter_state_dict("default")
        assert model.peft_config["default"].init_lora_weights == init  # saved as given
    for key, value in tensors["olora"].items():
        torch.testing.assert_close(tensors["OLoRA"][key], value, atol=0, rtol=0)


def test_unmatched_pattern_keys_are_named_apart_from_the_targets() -> None:
    config = lora(target_modules=["linear"], alpha_pattern={"linear": 4, "typo_key": 4})
    with pytest.warns(RuntimeWarning) as record:
        tilpass.get_peft_model(Net(), config)
    (message,) = [str(w.message) for w in record if "did not match" in str(w.message)]
    assert "typo_key" in message.split("ignored:")[1]
    assert "linear" not in message.split("ignored:")[1]
