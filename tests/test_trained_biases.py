"""Base biases trained with an adapter (PEFT's `bias="all"` / `"lora_only"`): which biases
train, the file's keys and values against PEFT's, loading both ways, and PEFT's rules (one
such adapter per model, a warning when disabling)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import tilpass
from tests.parity import TOL, outputs, perturb

BIASES = ["all", "lora_only"]


class MLP(nn.Module):
    """lin0 (adapted) -> ReLU -> lin1 (not adapted) -> norm (a bias outside any linear)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 16)
        self.lin1 = nn.Linear(16, 4)
        self.norm = nn.LayerNorm(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.lin1(torch.relu(self.lin0(x))))


def mlp() -> MLP:
    torch.manual_seed(0)
    return MLP().eval()


def settings(bias: str) -> dict:
    return {"target_modules": ["lin0"], "bias": bias, "init_lora_weights": False}


X = torch.randn(5, 10, generator=torch.Generator().manual_seed(3))
EXPECTED_KEYS = {
    "all": {"lin0.base_layer.bias", "lin1.bias", "norm.bias"},
    "lora_only": {"lin0.base_layer.bias"},
}


def shift_biases(model: tilpass.AdaptedModel) -> None:
    """Give the trained biases new values, as training would (so a file without them cannot
    match)."""
    with torch.no_grad():
        for param in model.trained_biases("default").values():
            param.add_(0.5)


@pytest.mark.parametrize("bias", BIASES)
def test_bias_trains_the_biases_peft_trains(bias: str) -> None:
    import peft

    ours = tilpass.get_peft_model(mlp(), tilpass.LoraConfig(**settings(bias)))
    theirs = peft.get_peft_model(mlp(), peft.LoraConfig(**settings(bias)))
    peft_names = {n for n, p in theirs.named_parameters() if p.requires_grad}
    peft_names = {n.replace("base_model.model.", "") for n in peft_names}
    assert {n for n in peft_names if n.endswith("bias")} == EXPECTED_KEYS[bias]
    biases = {n.replace("base_layer.", "") for n in EXPECTED_KEYS[bias]}  # tilpass's names
    trained = {n for n, p in ours.base_model.named_parameters() if p.requires_grad}
    assert trained == biases | {"lin0.lora_A.default", "lin0.lora_B.default"}
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


@pytest.mark.parametrize("bias", BIASES)
def test_bias_file_keys_and_values_load_both_ways(bias: str, tmp_path: Path) -> None:
    import peft

    ours = tilpass.get_peft_model(mlp(), tilpass.LoraConfig(**settings(bias)))
    perturb(ours.adapter_parameters("default"), seed=1)
    shift_biases(ours)
    ours.save_pretrained(tmp_path / "ours")
    saved = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    prefix = "base_model.model."
    lora_keys = {f"{prefix}lin0.lora_A.weight", f"{prefix}lin0.lora_B.weight"}
    assert set(saved) == {prefix + k for k in EXPECTED_KEYS[bias]} | lora_keys
    theirs = peft.PeftModel.from_pretrained(mlp(), tmp_path / "ours").eval()
    assert set(saved) == set(peft.get_peft_model_state_dict(theirs))  # PEFT's own keys
    for key, value in peft.get_peft_model_state_dict(theirs).items():
        torch.testing.assert_close(value, saved[key], rtol=0, atol=0)
    torch.testing.assert_close(outputs(theirs, X), outputs(ours, X), **TOL)
    assert not torch.allclose(outputs(mlp(), X), outputs(ours, X))

    peft_model = peft.get_peft_model(mlp(), peft.LoraConfig(**settings(bias)))
    perturb([p for p in peft_model.parameters() if p.requires_grad], seed=2)
    peft_model.save_pretrained(tmp_path / "peft")
    loaded = tilpass.AdaptedModel.from_pretrained(mlp(), tmp_path / "peft")
    torch.testing.assert_close(outputs(loaded, X), outputs(peft_model.eval(), X), **TOL)


def test_set_peft_model_state_dict_loads_biases_like_peft() -> None:
    source = tilpass.get_peft_model(mlp(), tilpass.LoraConfig(**settings("all")))
    perturb(source.adapter_parameters("default"), seed=5)
    state = tilpass.get_peft_model_state_dict(source)
    target = tilpass.get_peft_model(mlp(), tilpass.LoraConfig(**settings("none")))
    loaded = tilpass.set_peft_model_state_dict(target, state)
    assert loaded.unexpected_keys == [] and loaded.missing_keys == []
    torch.testing.assert_close(outputs(target, X), outputs(source, X), rtol=0, atol=0)


def test_only_one_adapter_may_train_biases() -> None:
    model = tilpass.get_peft_model(mlp(), tilpass.LoraConfig(**settings("all")), "first")
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(ValueError, match="supports only 1 adapter with bias"):
        model.add_adapter("second", tilpass.LoraConfig(**settings("lora_only")))
    with pytest.raises(ValueError, match="supports only 1 adapter with bias"):
        model.add_adapter("third", tilpass.LoraConfig(**settings("all")))
    assert list(model.peft_config) == ["first"]
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    model.add_adapter("plain", tilpass.LoraConfig(**settings("none")))  # bias="none" is fine


def test_disabling_an_adapter_that_trains_biases_warns() -> None:
    model = tilpass.get_peft_model(mlp(), tilpass.LoraConfig(**settings("all")))
    with (
        pytest.warns(UserWarning, match="Careful, disabling adapter layers with bias"),
        model.disable_adapter(),
    ):
        pass


def test_an_unknown_bias_value_is_refused() -> None:
    with pytest.raises(ValueError, match="bias must be one of 'none', 'all', 'lora_only'"):
        tilpass.LoraConfig(target_modules=["lin0"], bias="some")
