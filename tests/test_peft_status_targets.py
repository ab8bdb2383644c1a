"""PEFT's status reports, targeting errors and config fields on tilpass, compared with PEFT.

`get_layer_status` / `get_model_status` are compared with PEFT's on the same small models as
whole dicts (names, layer kinds, counts, devices); the targeting errors and warnings are
checked for PEFT's wording and exception classes; `runtime_config` for PEFT's round trip.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import tilpass
from tilpass.methods.lora.config import LoraRuntimeConfig

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.filterwarnings("ignore:LoRA rank:UserWarning")


class MLP(nn.Module):
    """PEFT's test MLP: two linears with an activation, dropout and softmax between."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.lin1 = nn.Linear(20, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sm(self.lin1(self.drop(self.relu(self.lin0(x)))))


class Mixed(nn.Module):
    """A linear, a 2-d convolution and an embedding (every LoRA layer kind in one model)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 10)
        self.conv0 = nn.Conv2d(3, 10, 3)
        self.emb0 = nn.Embedding(10, 10)
        self.lin1 = nn.Linear(10, 10)


def _both(make: Callable[[], nn.Module], **config: Any) -> tuple[Any, Any]:
    """The same model and config under tilpass and under PEFT."""
    torch.manual_seed(0)
    ours = tilpass.get_peft_model(make(), tilpass.LoraConfig(**config))
    torch.manual_seed(0)
    theirs = peft.get_peft_model(make(), peft.LoraConfig(**config))
    return ours, theirs


def _layers(model: Any) -> list[dict[str, Any]]:
    return [dataclasses.asdict(s) for s in model.get_layer_status()]


@pytest.mark.parametrize(
    ("make", "config"),
    [
        (MLP, {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
        (Mixed, {"target_modules": ["lin0", "conv0", "emb0"], "trainable_token_indices": None}),
        (Mixed, {"target_modules": ["lin0"], "trainable_token_indices": {"emb0": [0, 1, 2]}}),
        (MLP, {"target_modules": ["lin1"], "target_parameters": ["lin0.weight"]}),
    ],
    ids=["modules_to_save", "layer kinds", "trainable tokens", "target_parameters"],
)
def test_layer_and_model_status_equal_peft_s(
    make: Callable[[], nn.Module], config: dict[str, Any]
) -> None:
    ours, theirs = _both(make, **config)
    assert _layers(ours) == _layers(theirs)
    assert dataclasses.asdict(ours.get_model_status()) == dataclasses.asdict(
        theirs.get_model_status()
    )
    ours.add_adapter("other", tilpass.LoraConfig(**config))
    theirs.add_adapter("other", peft.LoraConfig(**config))
    ours.set_adapter("other")
    theirs.set_adapter("other")
    assert _layers(ours) == _layers(theirs)
    assert dataclasses.asdict(ours.get_model_status()) == dataclasses.asdict(
        theirs.get_model_status()
    )


def test_status_of_injected_layers_names_the_plain_model() -> None:
    model = tilpass.inject_adapter_in_model(tilpass.LoraConfig(target_modules=["lin0"]), MLP())
    (layer,) = tilpass.get_layer_status(model)
    assert (layer.name, layer.module_type) == ("lin0", "lora.Linear")
    status = tilpass.get_model_status(model)
    assert (status.base_model_type, status.adapter_model_type) == ("MLP", "None")


def test_targeted_parameter_names() -> None:
    config = {"target_modules": ["lin1"], "target_parameters": ["lin0.weight"]}
    ours, theirs = _both(MLP, **config)
    assert ours.targeted_parameter_names == theirs.targeted_parameter_names == ["lin0.weight"]
    assert ours.targeted_module_names == theirs.targeted_module_names == ["lin1"]
    config = {"target_modules": ["lin0"], "trainable_token_indices": {"emb0": [1]}}
    ours, theirs = _both(Mixed, **config)
    assert ours.targeted_module_names == theirs.targeted_module_names == ["lin0"]


def test_parameter_of_the_top_level_module_is_refused_as_in_peft() -> None:
    class Top(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.param = nn.Parameter(torch.zeros(4, 4))
            self.lin = nn.Linear(4, 4)

    message = (
        r"Targeting an nn.Parameter on the top-level module is not supported \(parameter 'param'\)"
    )
    for library in (tilpass, peft):
        with pytest.raises(ValueError, match=message):
            library.get_peft_model(Top(), library.LoraConfig(target_parameters=["param"]))


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"target_modules": ["lin0", "lin1", "relu", "drop", "sm"],
             "exclude_modules": ["lin0", "lin1", "relu", "drop", "sm"]},
            "All modules were excluded",
        ),
        ({"target_modules": ["nothing"]}, "Target modules .* not found in the base model"),
        (
            {"target_modules": ["lin0", "nothing"], "exclude_modules": ["lin0"]},
            "No modules were targeted for adaptation",
        ),
        (
            {"target_modules": ["nothing"], "modules_to_save": ["lin1"]},
            "No modules were targeted for adaptation",
        ),
    ],
)  # fmt: skip
def test_nothing_targeted_errors_as_in_peft(config: dict[str, Any], message: str) -> None:
    with pytest.raises(peft.NoMatchingPeftModuleError, match=message):
        peft.get_peft_model(MLP(), peft.LoraConfig(**config))
    with pytest.raises(tilpass.NoMatchingPeftModuleError, match=message):
        tilpass.get_peft_model(MLP(), tilpass.LoraConfig(**config))
    model = tilpass.get_peft_model(MLP(), tilpass.LoraConfig(target_modules=["lin0"]))
    with pytest.raises(tilpass.NoMatchingPeftModuleError, match=message) as info:
        model.add_adapter("other", tilpass.LoraConfig(**config))
    assert isinstance(info.value, tilpass.PeftError) and isinstance(info.value, ValueError)
    assert "other" not in model.peft_config


def test_an_entry_matching_nothing_beside_matches_is_still_an_error() -> None:
    """tilpass is stricter than PEFT here: a typo beside a real name is an error too."""
    with pytest.raises(tilpass.NoMatchingPeftModuleError) as info:
        tilpass.get_peft_model(MLP(), tilpass.LoraConfig(target_modules=["lin0", "lin_9"]))
    assert str(info.value).startswith("Target modules ['lin_9'] not found in the base model")
    assert "Linear: lin0, lin1" in str(info.value)


def test_unused_exclude_modules_warns_as_in_peft() -> None:
    config = {"target_modules": ["lin1"], "exclude_modules": ["nothing"]}
    message = "You have passed exclude_modules=.* but no modules were excluded"
    for library in (tilpass, peft):
        with pytest.warns(UserWarning, match=message):
            library.get_peft_model(MLP(), library.LoraConfig(**config))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tilpass.get_peft_model(
            MLP(), tilpass.LoraConfig(target_modules="lin.", exclude_modules="lin0")
        )


def test_runtime_config_is_kept_in_memory_and_never_saved(tmp_path: Path) -> None:
    config = tilpass.LoraConfig(
        target_modules=["lin0"], runtime_config=LoraRuntimeConfig(ephemeral_gpu_offload=True)
    )
    assert config.runtime_config.ephemeral_gpu_offload
    assert "runtime_config" not in config.to_dict()
    config.save_pretrained(tmp_path)
    assert "runtime_config" not in json.loads((tmp_path / "adapter_config.json").read_text())
    loaded = tilpass.LoraConfig.from_pretrained(tmp_path)
    assert loaded.runtime_config == LoraRuntimeConfig()
    assert loaded.to_dict() == config.to_dict()
    # a hand-written entry is dropped with PEFT's warning, on every way of reading the file
    data = {**config.to_dict(), "runtime_config": {"ephemeral_gpu_offload": True}}
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="contains a `runtime_config` key. This is ignored"):
        loaded = tilpass.PeftConfig.from_pretrained(tmp_path)
    assert not loaded.runtime_config.ephemeral_gpu_offload


class Wide(nn.Module):
    """Two linears wide enough for 4-bit blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(64, 64)
        self.lin1 = nn.Linear(64, 64)


@pytest.mark.parametrize(
    ("skip", "layers", "model"),
    [((), ["bnb 4bit"] * 2, "bnb 4bit"), (("lin1",), ["bnb 4bit", None], "irregular")],
)
def test_quantization_backend_of_a_4bit_base(
    skip: tuple[str, ...], layers: list[str | None], model: str
) -> None:
    pytest.importorskip("bitsandbytes")
    from tilpass.quantize import QuantizeConfig, quantize_model

    base = Wide()
    quantize_model(base, QuantizeConfig(skip_modules=skip))
    adapted = tilpass.get_peft_model(base, tilpass.LoraConfig(target_modules=["lin0", "lin1"]))
    assert [s.quantization_backend for s in adapted.get_layer_status()] == layers
    assert adapted.get_model_status().quantization_backend == model


class AddOne(nn.Module):
    """A parametrization: the module uses its stored weight plus one."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + 1


def _parametrized() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3, bias=False))
    model[0].other_weight = nn.Parameter(torch.randn(3, 4))
    parametrize.register_parametrization(model[0], "weight", AddOne())
    return model


def test_target_parameters_on_a_parametrized_weight_as_in_peft() -> None:
    config = {"r": 2, "lora_alpha": 6, "target_parameters": ["0.weight"]}
    ours = tilpass.get_peft_model(_parametrized(), tilpass.LoraConfig(**config))
    theirs = peft.get_peft_model(_parametrized(), peft.LoraConfig(**config))
    layer, wrapper = ours.base_model[0], theirs.base_model.model[0]
    torch.manual_seed(1)
    a, b = torch.randn(2, 4), torch.randn(3, 2)  # B non-zero: the update shows in the output
    with torch.no_grad():
        for store, value in ((layer.lora_A_0, a), (layer.lora_B_0, b)):
            store["default"].copy_(value)
        wrapper.lora_A["default"].weight.copy_(a)
        wrapper.lora_B["default"].weight.copy_(b)
    x = torch.randn(5, 4)
    used = _parametrized()[0].weight.detach().double()  # stored weight + 1
    expected = x.double() @ (used + 3.0 * b.double() @ a.double()).T
    with torch.no_grad():
        torch.testing.assert_close(ours(x).double(), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours(x), theirs(x))
    other = {**config, "target_parameters": ["0.other_weight"]}
    for model, library in ((ours, tilpass), (theirs, peft)):
        with pytest.raises(ValueError, match="all adapters must target the same set of parameters"):
            model.add_adapter("other", library.LoraConfig(**other))
        assert "other" not in model.peft_config
    refused = r"into weight of \w*Linear is not supported: it is parametrized"
    with pytest.raises(NotImplementedError, match=refused):
        ours.merge_adapter()
    with torch.no_grad():
        unloaded = ours.unload()(x).double()
        torch.testing.assert_close(unloaded, x.double() @ used.T, atol=1e-5, rtol=1e-5)
