"""PEFT's behaviour when a LoRA config names no targets (the model family's defaults) and when
a model that already carries adapter layers is wrapped again, compared with PEFT itself."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from helpers import tiny_gpt2, tiny_llama, tokens
from torch import nn

import tilpass
from tilpass.methods.lora.defaults import DEFAULT_TARGETS

os.environ.setdefault("HF_HUB_OFFLINE", "1")
peft = pytest.importorskip("peft")


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_unset_targets_are_the_family_s_defaults_as_in_peft(build: object) -> None:
    ours = tilpass.get_peft_model(build(), tilpass.LoraConfig(init_lora_weights=False))
    theirs = peft.get_peft_model(build(), peft.LoraConfig(init_lora_weights=False))
    assert ours.targeted_module_names == theirs.targeted_module_names
    assert (
        set(ours.peft_config["default"].target_modules)
        == theirs.peft_config["default"].target_modules
    )
    result = peft.set_peft_model_state_dict(theirs, tilpass.get_peft_model_state_dict(ours))
    assert not result.unexpected_keys
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=x).logits, theirs(input_ids=x).logits)


def test_a_model_without_a_known_family_still_needs_targets() -> None:
    assert DEFAULT_TARGETS["llama"] == ("q_proj", "v_proj")
    with pytest.raises(tilpass.TargetModulesError, match=r"target_modules is not set.*Linear: 0"):
        tilpass.get_peft_model(nn.Sequential(nn.Linear(4, 4)), tilpass.LoraConfig())


def test_wrapping_a_model_with_adapter_layers_again_warns() -> None:
    base = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    config = tilpass.LoraConfig(target_modules=["0"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = tilpass.get_peft_model(base, config)
    with pytest.warns(UserWarning, match="modify a model with PEFT for a second time"):
        tilpass.get_peft_model(base, tilpass.LoraConfig(target_modules=["1"]))
    model.unload()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tilpass.get_peft_model(base, config)
