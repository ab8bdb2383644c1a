"""PEFT's task classes (`PeftModelForCausalLM`, ...) and `get_peft_model`'s choice of class and
of `base_model_name_or_path`, as PEFT makes them."""

from __future__ import annotations

import functools
import warnings
from typing import Any

import pytest
from torch import nn

import tilpass
from tilpass.saved_modules import ModulesToSave

pytestmark = pytest.mark.filterwarnings("ignore:LoRA rank:UserWarning")


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 6)
        self.score = nn.Linear(6, 2)


def test_get_peft_model_returns_the_task_class_and_trains_the_head() -> None:
    config = tilpass.LoraConfig(target_modules=["linear"], task_type="SEQ_CLS")
    model = tilpass.get_peft_model(Classifier(), config)
    assert type(model) is tilpass.PeftModelForSequenceClassification
    assert isinstance(model.get_base_model().score, ModulesToSave)
    assert model.peft_config["default"].modules_to_save == ["score"]
    assert config.modules_to_save is None  # the caller's config is left alone
    causal = tilpass.get_peft_model(
        Classifier(), tilpass.LoraConfig(target_modules=["linear"], task_type="CAUSAL_LM")
    )
    assert type(causal) is tilpass.PeftModelForCausalLM
    plain = tilpass.get_peft_model(Classifier(), tilpass.LoraConfig(target_modules=["linear"]))
    assert type(plain) is tilpass.AdaptedModel


@pytest.mark.parametrize(
    ("cls", "saved"),
    [
        (tilpass.PeftModelForTokenClassification, ["score"]),
        (tilpass.PeftModelForQuestionAnswering, None),  # the model has no `qa_outputs`
    ],
)
def test_task_classes_add_only_the_heads_the_model_has(cls: Any, saved: Any) -> None:
    model = cls(Classifier(), tilpass.LoraConfig(target_modules=["linear"]))
    assert model.peft_config["default"].modules_to_save == saved
    assert isinstance(model.get_base_model().score, ModulesToSave) == bool(saved)


def test_a_constructor_wrapped_to_read_attributes_first_works() -> None:
    """DeepSpeed wraps `__init__` in a function that reads an attribute before it runs."""
    cls = tilpass.PeftModelForCausalLM
    original = cls.__init__

    @functools.wraps(original)
    def wrapped(self: Any, *args: Any, **kwargs: Any) -> None:
        assert not hasattr(self, "abc")
        original(self, *args, **kwargs)

    try:
        cls.__init__ = wrapped  # type: ignore[method-assign]
        cls(Classifier(), tilpass.LoraConfig(target_modules=["linear"]))
    finally:
        cls.__init__ = original  # type: ignore[method-assign]


def test_base_model_name_is_the_models_own_with_peft_s_warning() -> None:
    module = Classifier()
    config = tilpass.LoraConfig(target_modules=["linear"], base_model_name_or_path="custom")
    with pytest.warns(UserWarning, match="was renamed from 'custom' to 'None'"):
        model = tilpass.get_peft_model(module, config)
    assert model.peft_config["default"].base_model_name_or_path is None
    named = Classifier()
    named.name_or_path = "foobar"
    with pytest.warns(UserWarning, match="was renamed from 'custom' to 'foobar'"):
        model = tilpass.get_peft_model(named, config)
    assert model.peft_config["default"].base_model_name_or_path == "foobar"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tilpass.get_peft_model(Classifier(), tilpass.LoraConfig(target_modules=["linear"]))
