"""`get_base_model_state_dict` / `set_base_model_state_dict`: the base model's tensors of an
adapted model under the base model's keys, against PEFT's functions."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tilpass


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 8)
        self.lin0 = nn.Linear(8, 8)
        self.lin1 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(self.emb(x))))


def net() -> Net:
    torch.manual_seed(0)
    return Net()


SETTINGS = {"target_modules": ["lin0", "emb"], "modules_to_save": ["lin1"]}


def test_base_state_dict_keys_and_values_match_peft_and_round_trip() -> None:
    import peft

    original = {k: v.clone() for k, v in net().state_dict().items()}
    ours = tilpass.get_peft_model(net(), tilpass.LoraConfig(init_lora_weights=False, **SETTINGS))
    theirs = peft.get_peft_model(net(), peft.LoraConfig(init_lora_weights=False, **SETTINGS))
    extracted = tilpass.get_base_model_state_dict(ours)
    assert set(extracted) == set(original) == set(peft.get_base_model_state_dict(theirs))
    for key, value in original.items():
        torch.testing.assert_close(extracted[key], value, rtol=0, atol=0)
    with torch.no_grad():
        for param in ours.get_base_model().parameters():
            param.add_(1.0)  # adapters too: loading must restore only the base tensors
    adapter = {k: v.clone() for k, v in tilpass.get_peft_model_state_dict(ours).items()}
    result = tilpass.set_base_model_state_dict(ours, original)
    assert result.missing_keys == [] and result.unexpected_keys == []
    for key, value in tilpass.get_base_model_state_dict(ours).items():
        torch.testing.assert_close(value, original[key], rtol=0, atol=0)
    for key, value in tilpass.get_peft_model_state_dict(ours).items():
        torch.testing.assert_close(value, adapter[key], rtol=0, atol=0)


def test_strict_base_load_refuses_unknown_keys_and_loads_nothing() -> None:
    ours = tilpass.get_peft_model(net(), tilpass.LoraConfig(**SETTINGS))
    state = {k: v.clone() for k, v in tilpass.get_base_model_state_dict(ours).items()}
    changed = {k: v + 1 for k, v in state.items()} | {"nope.weight": torch.zeros(1)}
    with pytest.raises(RuntimeError, match=r"unexpected keys \['nope.weight'\]"):
        tilpass.set_base_model_state_dict(ours, changed)
    assert all(torch.equal(v, state[k]) for k, v in tilpass.get_base_model_state_dict(ours).items())
    result = tilpass.set_base_model_state_dict(ours, changed, strict=False)
    assert result.unexpected_keys == ["nope.weight"] and result.missing_keys == []
