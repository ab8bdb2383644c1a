"""The per-method test matrix: every registered method passes the same invariants.

Adding a method adds one `Row`. Each row builds a config for the tiny Llama with random,
non-zero adapter tensors (so no check passes vacuously) and a float64 reference: for one layer
where the method wraps layers, or for the whole model where it changes the model's inputs
(prompt tuning), since then no single layer's output carries the change. Logits are compared
on the real tokens (a method that prepends virtual tokens returns logits for those too).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import tilpass
from tests.helpers import tiny_llama, tokens
from tests.reference import adalora_ref, bottleneck_ref, ia3_ref, lora_ref, prompt_ref
from tilpass.config import AdapterConfig
from tilpass.layers import AdapterLayer
from tilpass.methods import METHODS, method_of

TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-5)}


@dataclasses.dataclass(frozen=True)
class Row:
    """One method in the matrix."""

    name: str
    config: Callable[..., AdapterConfig]  # tilpass config for the tiny Llama, random init
    # float64 reference of one wrapped layer (methods that wrap layers) ...
    reference: Callable[[nn.Linear, AdapterLayer, str, torch.Tensor], torch.Tensor] | None
    peft_config: Callable[[Any], Any] | None = None  # (peft module) -> peft config, same init
    mixed_batches: bool = True  # False: a routed batch must refuse with a clear error
    # ... or of the whole model: (float64 base model, adapted model, input ids) -> logits
    model_reference: Callable[[nn.Module, Any, torch.Tensor], torch.Tensor] | None = None
    unloads_merged: bool = True  # False: merge keeps part of the adapter outside the weights
    # Set when merging into the tiny Llama must refuse: (exception type, message pattern).
    merge_refusal: tuple[type[Exception], str] | None = None

    def __str__(self) -> str:
        return self.name


def _lora(**kw: Any) -> AdapterConfig:
    settings = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}
    return tilpass.LoraConfig(**{**settings, "init_lora_weights": False, **kw})


def _lora_ref(base: nn.Linear, layer: AdapterLayer, name: str, x: torch.Tensor) -> torch.Tensor:
    t = layer.adapter_tensors(name)
    scale = layer.specs[name].scale
    return lora_ref.linear(x, base.weight, base.bias, t["lora_A.weight"], t["lora_B.weight"], scale)


def _dora_ref(base: nn.Linear, layer: AdapterLayer, name: str, x: torch.Tensor) -> torch.Tensor:
    t = layer.adapter_tensors(name)
    return lora_ref.dora(
        x,
        base.weight,
        base.bias,
        t["lora_A.weight"],
        t["lora_B.weight"],
        layer.specs[name].scale,
        t["lora_magnitude_vector"],
    )


def _lora_bias_ref(
    base: nn.Linear, layer: AdapterLayer, name: str, x: torch.Tensor
) -> torch.Tensor:
    t = layer.adapter_tensors(name)
    scale = layer.specs[name].scale
    shift = scale * t["lora_B.bias"]
    bias = shift if base.bias is None else base.bias + shift
    return lora_ref.linear(x, base.weight, bias, t["lora_A.weight"], t["lora_B.weight"], scale)


def _ia3(**kw: Any) -> AdapterConfig:
    from tilpass.methods.ia3 import IA3Config

    return IA3Config(**{"init_ia3_weights": False, **kw})


def _ia3_ref(base: nn.Linear, layer: AdapterLayer, name: str, x: torch.Tensor) -> torch.Tensor:
    ff = layer.specs[name].feedforward
    return ia3_ref.linear(x, base.weight, base.bias, layer.adapter_tensors(name)["ia3_l"], ff)


def _bottleneck(**kw: Any) -> AdapterConfig:
    from tilpass.methods.bottleneck import BottleneckConfig

    kw.pop("target_modules", None)  # placement comes from slots, not module names
    settings = {"bottleneck_size": 4, "non_linearity": "gelu", "scaling": 0.5}
    return BottleneckConfig(**{**settings, "init_weights": False, **kw})


def _bottleneck_ref(
    base: nn.Linear, layer: AdapterLayer, name: str, x: torch.Tensor
) -> torch.Tensor:
    spec = layer.specs[name]
    tensors = layer.adapter_tensors(name)
    return bottleneck_ref.adapter(x, base(x), tensors, spec.activation, spec.scale, spec.parallel)


def _peft_lora(peft: Any, **kw: Any) -> Any:
    return peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        init_lora_weights=False,
        **kw,
    )


def _adalora(**kw: Any) -> AdapterConfig:
    from tilpass.methods.adalora import AdaLoraConfig

    settings = {"init_r": 4, "target_r": 2, "total_step": 10, "lora_alpha": 6}
    targets = {"target_modules": ["q_proj", "v_proj", "down_proj"]}
    return AdaLoraConfig(**{**settings, **targets, "init_lora_weights": False, **kw})


def _adalora_ref(base: nn.Linear, layer: AdapterLayer, name: str, x: torch.Tensor) -> torch.Tensor:
    t = layer.adapter_tensors(name)
    scale = layer.specs[name].scale
    return adalora_ref.svd_linear(
        x, base.weight, base.bias, t["lora_A"], t["lora_E"], t["lora_B"], scale
    )


def _peft_adalora(peft: Any, **kw: Any) -> Any:
    return peft.AdaLoraConfig(
        init_r=4,
        target_r=2,
        total_step=10,
        lora_alpha=6,
        target_modules=["q_proj", "v_proj", "down_proj"],
        init_lora_weights=False,
        **kw,
    )


def _prompt(**kw: Any) -> AdapterConfig:
    kw.pop("target_modules", None)  # prompt tuning targets the input embedding only
    return tilpass.PromptTuningConfig(**{"num_virtual_tokens": 3, **kw})


def _prompt_ref(base: nn.Module, model: Any, x: torch.Tensor) -> torch.Tensor:
    virtual = model.adapter_state_dict("default")["prompt_embeddings"]
    return prompt_ref.causal_lm_logits(base, virtual, x)


def _hybrid(**kw: Any) -> AdapterConfig:
    settings = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}
    return tilpass.LoraPromptConfig(
        **{**settings, "init_lora_weights": False, "num_virtual_tokens": 3, **kw}
    )


ROWS = [
    Row("lora", _lora, _lora_ref, _peft_lora),
    Row("dora", lambda **kw: _lora(use_dora=True, **kw), _dora_ref),
    Row(
        "lora-bias",
        lambda **kw: _lora(lora_bias=True, **kw),
        _lora_bias_ref,
        lambda peft: _peft_lora(peft, lora_bias=True),
        # the tiny Llama's projections have no bias to merge B's bias into
        merge_refusal=(RuntimeError, "has no bias"),
    ),
    Row(
        "ia3",
        _ia3,
        _ia3_ref,
        lambda peft: peft.IA3Config(
            target_modules=["k_proj", "v_proj", "down_proj"],
            feedforward_modules=["down_proj"],
            init_ia3_weights=False,
        ),
    ),
    Row(
        "prompt_tuning",
        _prompt,
        None,
        lambda peft: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
        model_reference=_prompt_ref,
        unloads_merged=False,
    ),
    # PEFT has no such method; its LoRA part's interop is in test_lora_prompt.py
    Row("lora+prompt", _hybrid, _lora_ref, unloads_merged=False),
    Row("adalora", _adalora, _adalora_ref, _peft_adalora),
    Row(
        "bottleneck",
        _bottleneck,
        _bottleneck_ref,
        merge_refusal=(NotImplementedError, "cannot be merged"),
    ),
]


def test_every_registered_method_has_a_row() -> None:
    covered = {type(row.config()).PEFT_TYPE for row in ROWS}
    assert covered == {m.peft_type for m in METHODS.values()}


def logits(model: nn.Module, x: torch.Tensor, **kw: Any) -> torch.Tensor:
    """Logits of the real tokens (virtual tokens a method prepends are left out)."""
    with torch.no_grad():
        return model(input_ids=x, **kw).logits[:, -x.shape[1] :]


def adapted(row: Row, seed: int = 0, **kw: Any) -> tilpass.AdaptedModel:
    torch.manual_seed(seed + 100)
    return tilpass.get_peft_model(tiny_llama(seed), row.config(**kw))


@pytest.mark.parametrize("row", [r for r in ROWS if r.reference is not None], ids=str)
@pytest.mark.parametrize("module_name", ["mlp.down_proj", "self_attn.v_proj"])
@pytest.mark.parametrize("bias", [True, False])
def test_layer_matches_float64_reference(row: Row, module_name: str, bias: bool) -> None:
    torch.manual_seed(0)
    base = nn.Linear(12, 10, bias=bias, dtype=torch.float64)
    expected_base = base.weight.detach().clone()
    config = row.config(target_modules=[module_name.split(".")[-1]])
    layer = method_of(config).make_layer(base)
    layer.add_adapter("a", 0, config.layer_spec(f"model.layers.0.{module_name}", True))
    layer.active = ["a"]
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    assert row.reference is not None
    expected = row.reference(base, layer, "a", x)
    assert not torch.allclose(expected, base(x))  # the adapter changes the output
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            torch.testing.assert_close(layer(x), expected, atol=1e-12, rtol=1e-12)
    assert torch.equal(base.weight, expected_base)


@pytest.mark.parametrize("row", [r for r in ROWS if r.model_reference is not None], ids=str)
def test_model_matches_float64_reference(row: Row) -> None:
    """Methods without a per-layer reference: the whole adapted model in float64 against the
    reference built from the plain base model (every position, virtual ones included)."""
    assert row.model_reference is not None
    x = tokens()
    model = adapted(row).double()
    with torch.no_grad():
        got = model(input_ids=x).logits
        expected = row.model_reference(tiny_llama().double(), model, x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
    assert not torch.allclose(got[:, -x.shape[1] :], logits(tiny_llama().double(), x))


@pytest.mark.parametrize("row", ROWS, ids=str)
def test_disabled_equals_base_bit_for_bit(row: Row) -> None:
    x = tokens()
    base = logits(tiny_llama(), x)
    model = adapted(row)
    assert not torch.allclose(logits(model, x), base)
    with model.disable_adapter():
        assert torch.equal(logits(model, x), base)


@pytest.mark.parametrize("row", ROWS, ids=str)
def test_save_load_gives_identical_logits(row: Row, tmp_path: Path) -> None:
    x = tokens()
    model = adapted(row)
    model.save_pretrained(tmp_path)
    loaded = tilpass.AdaptedModel.from_pretrained(tiny_llama(), tmp_path)
    assert torch.equal(logits(loaded, x), logits(model, x))
    assert loaded.peft_config["default"].peft_type == type(row.config()).PEFT_TYPE


@pytest.mark.parametrize("row", ROWS, ids=str)
def test_only_adapter_parameters_get_gradients(row: Row) -> None:
    model = adapted(row)
    model.train()
    x = tokens()
    model(input_ids=x, labels=x).loss.backward()
    adapter = {id(p) for p in model.adapter_parameters("default")}
    for name, param in model.named_parameters():
        if id(param) in adapter:
            assert param.grad is not None and bool(param.grad.any()), name
        else:
            assert param.grad is None and not param.requires_grad, name


@pytest.mark.parametrize("row", ROWS, ids=str)
def test_mixed_batch_rows_equal_single_adapter_runs(row: Row) -> None:
    model = adapted(row)
    torch.manual_seed(7)
    model.add_adapter("other", row.config())
    x = tokens(batch=4, length=5)
    names = ["default", "other", "__base__", "other"]
    if not row.mixed_batches:
        with pytest.raises(NotImplementedError, match="mixed batches"):
            model(input_ids=x, adapter_names=names)
        return
    mixed = logits(model, x, adapter_names=names)
    for i, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                expected = logits(model, x)
        else:
            model.set_adapter(name)
            expected = logits(model, x)
        torch.testing.assert_close(mixed[i], expected[i], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("row", [r for r in ROWS if r.mixed_batches], ids=str)
def test_mixed_batch_follows_in_place_updates(row: Row) -> None:
    """Derived state of the mixed path (stacked or tabled adapter tensors) is rebuilt when an
    adapter tensor changes in place, as an optimizer step changes it."""
    model = adapted(row)
    torch.manual_seed(7)
    model.add_adapter("other", row.config())
    x = tokens(batch=2, length=5)
    names = ["default", "other"]
    before = logits(model, x, adapter_names=names)
    with torch.no_grad():
        for param in model.adapter_parameters("other"):
            param.mul_(1.5).add_(0.25)
    after = logits(model, x, adapter_names=names)
    model.set_adapter("other")
    torch.testing.assert_close(after[1], logits(model, x)[1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(after[1], before[1], atol=1e-3)
    torch.testing.assert_close(after[0], before[0], atol=0, rtol=0)


@pytest.mark.parametrize("row", ROWS, ids=str)
def test_inference_mode_equals_no_grad(row: Row) -> None:
    """Forwards under `torch.inference_mode` (twice, so derived caches are reused) equal
    no-grad ones, with an adapter added inside inference mode too: its tensors then have no
    version counter, which the caches must not need."""
    model = adapted(row)
    with torch.inference_mode():
        torch.manual_seed(7)
        model.add_adapter("other", row.config())
    x = tokens(batch=2, length=5)
    calls = [{}, {"adapter_names": ["default", "other"]}] if row.mixed_batches else [{}]
    expected = [logits(model, x, **kw) for kw in calls]
    for _ in range(2):
        for kw, want in zip(calls, expected, strict=True):
            with torch.inference_mode():
                got = model(input_ids=x, **kw).logits[:, -x.shape[1] :]
            torch.testing.assert_close(got, want, atol=0, rtol=0)
    model.set_adapter("other")
    with torch.inference_mode():
        other = model(input_ids=x).logits[:, -x.shape[1] :]
    torch.testing.assert_close(other, logits(model, x), atol=0, rtol=0)
    assert not torch.allclose(other, expected[0], atol=1e-3)


@pytest.mark.parametrize("row", ROWS, ids=str)
def test_merge_equals_unmerged_and_unmerge_restores_the_base(row: Row) -> None:
    x = tokens()
    model = adapted(row)
    if row.merge_refusal is not None:
        error, pattern = row.merge_refusal
        with pytest.raises(error, match=pattern):
            model.merge_adapter()
        with pytest.raises(error, match=pattern):
            model.merge_and_unload()
        return
    before = {k: v.clone() for k, v in model.base_model.state_dict().items() if "." in k}
    unmerged = logits(model, x)
    model.merge_adapter()
    torch.testing.assert_close(logits(model, x), unmerged, atol=1e-5, rtol=1e-5)
    model.merge_adapter()  # idempotent
    torch.testing.assert_close(logits(model, x), unmerged, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    after = model.base_model.state_dict()
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, atol=1e-6, rtol=1e-6)
    if not row.unloads_merged:
        with pytest.raises(NotImplementedError, match="merge_adapter"):
            model.merge_and_unload()
        torch.testing.assert_close(logits(model, x), unmerged, atol=1e-5, rtol=1e-5)
        return
    plain = model.merge_and_unload()
    assert not any(isinstance(m, AdapterLayer) for m in plain.modules())
    torch.testing.assert_close(logits(plain, x), unmerged, atol=1e-5, rtol=1e-5)


PEFT_ROWS = [row for row in ROWS if row.peft_config is not None]


@pytest.mark.parametrize("row", PEFT_ROWS, ids=str)
def test_peft_interop_both_ways(row: Row, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    x = tokens()
    assert row.peft_config is not None
    torch.manual_seed(3)
    theirs = peft.get_peft_model(tiny_llama(), row.peft_config(peft))
    theirs.eval()
    theirs.save_pretrained(tmp_path / "peft")
    ours = tilpass.AdaptedModel.from_pretrained(tiny_llama(), tmp_path / "peft")
    torch.testing.assert_close(logits(ours, x), logits(theirs, x), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits(ours, x), logits(tiny_llama(), x))
    model = adapted(row, seed=0)
    model.save_pretrained(tmp_path / "ours")
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()
    ours_keys = set(model.adapter_state_dict("default"))
    theirs_keys = set(peft.utils.get_peft_model_state_dict(loaded))
    assert ours_keys == theirs_keys  # an exact key match: a wrong prefix "loads" as zeros
    torch.testing.assert_close(logits(loaded, x), logits(model, x), atol=1e-5, rtol=1e-5)
