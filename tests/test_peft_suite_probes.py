"""The PEFT harness's probes for tests that look at PEFT's implementation
(`compat/peft_suite/internals_probes.py`): PEFT's private functions handed a tilpass object,
`isinstance` checks against PEFT's classes that tilpass's layers fail, and reads of private
layer attributes. A test noted by one of them is classed as PEFT internals when it fails.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import pytest
from torch import nn

import tilpass

HARNESS = Path(__file__).resolve().parent.parent / "compat" / "peft_suite"
sys.path.insert(0, str(HARNESS))

import internals_probes  # noqa: E402
import report  # noqa: E402

peft = pytest.importorskip("peft")


def _peft_private(model: Any) -> str:
    return "ran"


def peft_public(model: Any) -> str:
    return "ran"


def test_private_peft_functions_handed_a_tilpass_object_are_noted() -> None:
    _peft_private.__module__ = peft_public.__module__ = "peft.tuners.fake"
    tests_module = types.ModuleType("tests.test_fake")
    tests_module.helper = _peft_private  # type: ignore[attr-defined]  # imported under an alias
    tests_module.public = peft_public  # type: ignore[attr-defined]
    tests_module.local = lambda model: model  # type: ignore[attr-defined]  # not PEFT's
    notes: list[str] = []
    assert internals_probes.watch_private_functions(tests_module, notes.append) == ["helper"]
    model = tilpass.get_peft_model(
        nn.Sequential(nn.Linear(4, 4)), tilpass.LoraConfig(target_modules=["0"])
    )
    assert tests_module.helper(nn.Linear(2, 2)) == "ran"  # a plain module: nothing noted
    assert notes == []
    assert tests_module.helper(model=model) == "ran"
    assert notes == ["hands a tilpass object to PEFT's private _peft_private"]


def test_peft_class_checks_and_private_reads_on_tilpass_layers_are_noted() -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    from tilpass.layers import AdapterLayer

    model = tilpass.get_peft_model(
        nn.Sequential(nn.Linear(4, 4)), tilpass.LoraConfig(target_modules=["0"])
    )
    layer = model.base_model[0]
    notes: list[str] = []
    probes = internals_probes.LayoutProbes(notes.append, AdapterLayer)
    probes.install()
    try:
        assert not isinstance(nn.Linear(2, 2), BaseTunerLayer)  # not a tilpass layer
        assert not hasattr(layer, "weight_other")  # a public name: tilpass's own gap
        assert hasattr(layer, "weight")
        assert notes == []
        assert not isinstance(layer, BaseTunerLayer)
        assert not hasattr(layer, "_dora_cache")
    finally:
        probes.uninstall()
    assert not hasattr(layer, "_dora_cache") and not isinstance(layer, BaseTunerLayer)
    assert notes == [
        "looks for PEFT's BaseTunerLayer among tilpass's layers (isinstance)",
        "reads PEFT's private layer attribute _dora_cache",
    ]
    record = {
        "message": "AssertionError: assert [None] == ['bnb 8bit']",
        "peft_internals": notes[0],
    }
    assert report.classify(record) == report.INTERNALS
    assert report.classify({"message": record["message"]}) == report.BEHAVIOUR


@pytest.mark.parametrize(
    ("owner", "attribute", "expected"),
    [("TrainableTokens", "token_adapter", report.INTERNALS),
     ("LoraConv", "lora_variant", report.INTERNALS),
     ("AdaLoraLinear", "ranknum", report.INTERNALS),
     ("LoraParameters", "embed_dim", report.BEHAVIOUR),  # the wrapped module's own attribute
     ("ModulesToSave", "weight", report.BEHAVIOUR),
     ("LoraConfig", "token_adapter", report.BEHAVIOUR),
     ("MLP", "token_adapter", report.BEHAVIOUR)],
)  # fmt: skip
def test_an_attribute_missing_on_a_tilpass_layer_is_peft_s_layer_layout_unless_torch_s(
    owner: str, attribute: str, expected: str
) -> None:
    record = {"message": f"AttributeError: '{owner}' object has no attribute '{attribute}'"}
    assert report.classify(record) == expected


def test_a_missing_private_attribute_is_peft_s_implementation() -> None:
    message = "AttributeError: 'LoraConfig' object has no attribute '_custom_modules'"
    assert report.classify({"message": message}) == report.INTERNALS
    message = "AttributeError: 'AdaptedModel' object has no attribute '__len__'"
    assert report.classify({"message": message}) == report.BEHAVIOUR
