"""Bottleneck adapters beyond the per-method matrix: placements per model family, each variant
(parallel, no residual, learned scale) against the float64 reference, mixed batches across
variants, the file layout and the errors a user can hit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import BertConfig, BertModel
from transformers.models.llama.modeling_llama import LlamaMLP

import tilpass
from tests.helpers import tiny_gpt2, tiny_llama, tokens
from tests.reference import bottleneck_ref
from tilpass.errors import AdapterFileError, TargetModulesError
from tilpass.methods.bottleneck import BottleneckConfig, BottleneckLayer


def config(**kw: Any) -> BottleneckConfig:
    return BottleneckConfig(**{"bottleneck_size": 4, "init_weights": False, **kw})


def wrapped(model: tilpass.AdaptedModel) -> list[str]:
    return sorted(
        n.removeprefix("model.layers.0.")
        for n, m in model.base_model.named_modules()
        if isinstance(m, BottleneckLayer) and ".0." in n
    )


def tiny_bert() -> BertModel:
    torch.manual_seed(0)
    cfg = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=128,
        max_position_embeddings=64,
    )
    return BertModel(cfg).eval()


@pytest.mark.parametrize(
    ("placement", "expected"),
    [("houlsby", ["mlp", "self_attn.o_proj"]), ("pfeiffer", ["mlp"]), ("parallel", ["mlp"])],
)
def test_placement_table_for_llama(placement: str, expected: list[str]) -> None:
    model = tilpass.get_peft_model(tiny_llama(), config(placement=placement))
    assert wrapped(model) == expected
    assert len(list(model.adapter_parameters("default"))) == 4 * len(expected) * 2


def test_placement_table_for_gpt2_and_bert() -> None:
    gpt2 = tilpass.get_peft_model(tiny_gpt2(), config())
    names = {n for n, m in gpt2.base_model.named_modules() if isinstance(m, BottleneckLayer)}
    assert names == {f"transformer.h.{i}.{s}" for i in range(2) for s in ("attn.c_proj", "mlp")}
    bert = tilpass.get_peft_model(tiny_bert(), config())
    names = {n for n, m in bert.base_model.named_modules() if isinstance(m, BottleneckLayer)}
    expected = {"attention.output.dense", "output.dense"}
    assert names == {f"encoder.layer.{i}.{s}" for i in range(2) for s in expected}
    x = tokens(batch=2, length=5)
    with torch.no_grad():
        out = bert(input_ids=x).last_hidden_state
        with bert.disable_adapter():
            base = bert(input_ids=x).last_hidden_state
    assert out.shape == base.shape and not torch.allclose(out, base)


@pytest.mark.parametrize("placement", ["houlsby", "parallel"])
def test_a_fresh_adapter_is_an_exact_no_op(placement: str) -> None:
    x = tokens()
    with torch.no_grad():
        base = tiny_llama()(input_ids=x).logits
        model = tilpass.get_peft_model(tiny_llama(), BottleneckConfig(placement=placement))
        assert torch.equal(model(input_ids=x).logits, base)


@pytest.mark.parametrize(
    "settings",
    [
        {"placement": "parallel", "non_linearity": "silu"},
        {"placement": "pfeiffer", "residual": False, "scaling": 2.0},
        {"placement": "pfeiffer", "scaling": "learned", "non_linearity": "relu"},
    ],
    ids=["parallel", "no-residual", "learned-scale"],
)
def test_mlp_variants_match_float64_reference(settings: dict[str, Any]) -> None:
    cfg = tiny_llama().config
    torch.manual_seed(0)
    mlp = LlamaMLP(cfg).double()
    layer = tilpass.methods.method_of(config(**settings)).make_layer(mlp)
    layer.add_adapter("a", 0, config(**settings).layer_spec("model.layers.0.mlp", True))
    layer.active = ["a"]
    if settings.get("scaling") == "learned":
        with torch.no_grad():
            layer.bottleneck["a"].adapter_scale.fill_(0.7)
    x = torch.randn(2, 5, cfg.hidden_size, dtype=torch.float64)
    scale = 0.7 if settings.get("scaling") == "learned" else settings.get("scaling", 1.0)
    spec = layer.specs["a"]
    expected = bottleneck_ref.adapter(
        x, mlp(x), layer.adapter_tensors("a"), spec.activation, scale, spec.parallel, spec.residual
    )
    torch.testing.assert_close(layer(x), expected, atol=1e-12, rtol=1e-12)


def assert_rows_equal_single_runs(model: Any, names: list[str], length: int) -> None:
    """A batch routed row by row to `names` ("__base__": no adapter) gives, in each row, what
    that row's adapter gives alone."""
    x = tokens(batch=len(names), length=length)
    with torch.no_grad():
        mixed = model(input_ids=x, adapter_names=names).logits
        for i, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    expected = model(input_ids=x).logits
            else:
                model.set_adapter(name)
                expected = model(input_ids=x).logits
            torch.testing.assert_close(mixed[i], expected[i], atol=1e-5, rtol=1e-5)


def test_mixed_batch_across_variants_and_sizes_equals_single_runs() -> None:
    """One batch mixes a Houlsby, a parallel, a no-residual and a learned-scale adapter of
    different widths; each row equals a run with its adapter alone."""
    torch.manual_seed(5)
    model = tilpass.get_peft_model(tiny_llama(), config())
    model.add_adapter("par", config(placement="parallel", bottleneck_size=6))
    model.add_adapter("nores", config(placement="pfeiffer", residual=False, bottleneck_size=2))
    model.add_adapter("learned", config(scaling="learned", non_linearity="gelu"))
    names = ["default", "par", "__base__", "nores", "learned", "par"]
    assert_rows_equal_single_runs(model, names, length=5)


@pytest.mark.parametrize(
    "names", [["b", "c", "b"], ["c", "__base__", "a", "b"]], ids=["some", "all"]
)
def test_mixed_batch_with_some_or_all_adapters_of_a_group(names: list[str]) -> None:
    """Adapters of one group (same source and non-linearity): a batch that uses only some of
    them selects their stacked rows, one that uses all reads the whole stack; each row
    equals a run with its adapter alone."""
    torch.manual_seed(6)
    model = tilpass.get_peft_model(tiny_llama(), config(), adapter_name="a")
    model.add_adapter("b", config(bottleneck_size=3))
    model.add_adapter("c", config(residual=False, placement="pfeiffer"))
    for name in ("a", "b", "c"):
        with torch.no_grad():
            for param in model.adapter_parameters(name):
                param.normal_(0, 0.3)
    assert_rows_equal_single_runs(model, names, length=4)


def test_learned_scale_trains_and_round_trips(tmp_path: Path) -> None:
    model = tilpass.get_peft_model(tiny_llama(), config(scaling="learned"))
    model.train()
    x = tokens()
    model(input_ids=x, labels=x).loss.backward()
    scales = [p for n, p in model.named_parameters() if n.endswith("adapter_scale")]
    assert scales and all(p.grad is not None and bool(p.grad.any()) for p in scales)
    model.eval()
    with torch.no_grad():
        for p in scales:
            p.fill_(0.3)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "BOTTLENECK" and saved["scaling"] == "learned"
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    prefix = "base_model.model.model.layers.0.mlp."
    suffixes = ["adapter_down.weight", "adapter_down.bias", "adapter_up.weight"]
    assert {prefix + s for s in [*suffixes, "adapter_up.bias", "adapter_scale"]} <= keys
    loaded = tilpass.AdaptedModel.from_pretrained(tiny_llama(), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, model(input_ids=x).logits)


def test_explicit_modules_for_a_model_outside_the_table() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(8, 8)
            self.ff = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.ff(self.proj(x))

    with pytest.raises(TargetModulesError, match="set attention_output_modules"):
        tilpass.get_peft_model(Block(), config())
    model = tilpass.get_peft_model(
        Block(), config(attention_output_modules=["proj"], mlp_modules="ff")
    )
    assert isinstance(model.base_model.ff, BottleneckLayer)
    assert isinstance(model.base_model.proj, BottleneckLayer)
    with pytest.raises(TargetModulesError, match=r"slot mlp .* matches no module"):
        tilpass.get_peft_model(Block(), config(attention_output_modules="proj", mlp_modules="fff"))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"placement": "serial"}, "placement 'serial': choose one of houlsby, pfeiffer"),
        ({"non_linearity": "tanh"}, "non_linearity 'tanh': choose one of relu, gelu, silu"),
        ({"scaling": "big"}, "scaling 'big': give a number or 'learned'"),
        ({"placement": "parallel", "residual": False}, "residual=False needs a sequential"),
        ({"bottleneck_size": 0}, "bottleneck_size must be >= 1"),
    ],
)
def test_bad_settings_are_clear_errors(
    settings: dict[str, Any], message: str, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match=message):
        BottleneckConfig(**settings)
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"peft_type": "BOTTLENECK", **settings})
    )
    with pytest.raises(AdapterFileError, match="adapter_config.json: " + message):
        tilpass.AdaptedModel.from_pretrained(tiny_llama(), tmp_path)


def test_parallel_is_refused_for_bert_with_a_way_out() -> None:
    with pytest.raises(TargetModulesError, match="no mlp modules for model type 'bert'"):
        tilpass.get_peft_model(tiny_bert(), config(placement="parallel"))


def test_adapters_inside_a_wrapped_block_load_in_either_order(tmp_path: Path) -> None:
    """An (IA)^3 adapter on up_proj and a bottleneck on the MLP around it: added in either
    order, the outputs and the files are the same, and removing one leaves the other."""
    from tilpass.methods.ia3 import IA3Config

    ia3 = IA3Config(
        target_modules=["up_proj"], feedforward_modules=["up_proj"], init_ia3_weights=False
    )
    torch.manual_seed(0)
    first = tilpass.get_peft_model(tiny_llama(), ia3, adapter_name="ia3")
    first.add_adapter("bn", config())
    first.save_pretrained(tmp_path / "a")
    # The bottleneck first this time, then the (IA)^3 adapter inside the MLP it wraps.
    second = tilpass.AdaptedModel.from_pretrained(tiny_llama(), tmp_path / "a" / "bn", "bn")
    second.load_adapter(tmp_path / "a" / "ia3", "ia3")
    second.save_pretrained(tmp_path / "b")
    for name in ("ia3", "bn"):
        saved = [load_file(tmp_path / d / name / "adapter_model.safetensors") for d in "ab"]
        assert saved[0].keys() == saved[1].keys()
        for key in saved[0]:
            assert torch.equal(saved[0][key], saved[1][key]), key
    x = tokens()
    with torch.no_grad():
        for model in (first, second):
            model.set_adapter(["ia3", "bn"])
        torch.testing.assert_close(second(input_ids=x).logits, first(input_ids=x).logits)
        base = tiny_llama()(input_ids=x).logits
        assert not torch.allclose(first(input_ids=x).logits, base)
        second.delete_adapter("bn")
        first.set_adapter("ia3")
        torch.testing.assert_close(second(input_ids=x).logits, first(input_ids=x).logits)
        second.delete_adapter("ia3")
        torch.testing.assert_close(second(input_ids=x).logits, base)
    second.add_adapter("bn", config())  # re-wrapping after both were removed still works
    assert wrapped(second) == wrapped(tilpass.get_peft_model(tiny_llama(), config()))
