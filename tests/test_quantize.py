"""A quantized base (bitsandbytes NF4 with double quantization) under the LoRA layer.

The format is checked against the QLoRA paper (the NF4 code book, the per-block rounding
bound, the double-quantized scales), and LoRA over a 4-bit base against LoRA over the same
weights dequantized, which is what the 4-bit layer computes with: whole tensors, one tolerance
per compute dtype, adapters initialised non-zero.
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from torch import nn

from tests import helpers
from tests.reference import lora_ref, nf4_ref
from tilpass import get_peft_model
from tilpass.layers import dense_weight
from tilpass.methods.lora import AdapterSpec, LoraLinear
from tilpass.methods.lora.dora import DORA
from tilpass.quantize import (
    BLOCKSIZE,
    QuantizationError,
    QuantizeConfig,
    RequantizeError,
    allow_requantize,
    block_scales,
    code_book,
    dequantize_model,
    dequantize_weight,
    measure_storage,
    quantize_linear,
    quantize_model,
)
from tilpass.routing import BASE

# (atol, rtol) per compute dtype: LoRA over the 4-bit layer vs LoRA over its dequantized
# weight in a plain nn.Linear. Both multiply by the same dequantized matrix; the difference is
# the kernels' summation order, and in bfloat16 the roundings: the base and adapter terms (of
# size ~5 here, where bfloat16's spacing is 0.03) are rounded separately before they are added,
# in float32 factors over the 4-bit base and bfloat16 ones over the plain layer, so a few
# spacings of the terms' size, not of the (possibly small) sum.
TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (1.2e-1, 3e-2)}


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol)


def randomize(model: nn.Module, seed: int = 0) -> None:
    """Every adapter tensor random and non-zero, reproducibly (inactive adapters' tensors too,
    which do not require grad)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.2)


def quantized_and_reference(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """A tiny Llama with NF4 linear layers, and the same model with those layers dequantized
    into plain nn.Linear (the weights the 4-bit layers compute with)."""
    model = helpers.tiny_llama(seed)
    report = quantize_model(model)
    assert len(report.quantized) == 14  # 7 linear layers per block, 2 blocks; lm_head kept
    reference = copy.deepcopy(model)
    assert dequantize_model(reference, torch.float32) == 14
    return model, reference


# -- the format ----------------------------------------------------------------------------


def test_nf4_code_book_is_the_papers() -> None:
    code = code_book("nf4")
    assert code.dtype == torch.float32
    assert torch.equal(code, torch.tensor(nf4_ref.PAPER_NF4, dtype=torch.float32))
    torch.testing.assert_close(code.double(), nf4_ref.nf4_from_quantiles(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("double_quant", [True, False])
def test_round_trip_error_within_the_block_bound(double_quant: bool) -> None:
    """|w - dequant(quant(w))| <= half the largest NF4 gap x the block's scale, plus the error
    of the (double-quantized) scale itself; the scales obey the 8-bit code's own bound."""
    torch.manual_seed(0)
    # 300 x 70 weights: 329 blocks of 64 and a short last block; more than 256 blocks, so the
    # scales span two blocks of the second quantization.
    linear = nn.Linear(70, 300, bias=False)
    with torch.no_grad():
        linear.weight.normal_(0, 0.02)
        linear.weight[0, 0] = 0.5  # an outlier: its block's other weights lose precision
    q = quantize_linear(linear, QuantizeConfig("nf4", double_quant=double_quant))
    w = linear.weight.detach().double().reshape(-1)
    approx = dequantize_weight(q).double().reshape(-1)
    true_scales = nf4_ref.blockwise_absmax(w, BLOCKSIZE)
    scales = block_scales(q.weight).double()
    assert scales.shape == true_scales.shape == (-(-w.numel() // BLOCKSIZE),)
    per_weight = torch.arange(w.numel()) // BLOCKSIZE
    gap = nf4_ref.max_half_gap(code_book("nf4"))
    bound = gap * true_scales[per_weight] + (true_scales - scales).abs()[per_weight] + 1e-7
    error = (w - approx).abs()
    assert bool((error <= bound).all()), float((error - bound).max())
    assert float(error.max()) > 0  # it is a lossy format: the check can fail
    if not double_quant:
        torch.testing.assert_close(scales, true_scales, atol=1e-7, rtol=1e-6)
        return
    state = q.weight.quant_state
    assert state.absmax.dtype == torch.uint8 and state.nested
    nested = state.state2.absmax.double()  # one float32 per 256 scales
    assert nested.shape == (-(-true_scales.numel() // 256),)
    scale_gap = nf4_ref.max_half_gap(state.state2.code)
    scale_bound = scale_gap * nested[torch.arange(true_scales.numel()) // 256] + 1e-7
    assert bool(((true_scales - scales).abs() <= scale_bound).all())


def test_measured_bits_per_weight() -> None:
    """NF4 with double quantization: 4 + 8/64 + 32/(64*256) bits, plus the code books (1 KiB a
    layer, which a 4096 x 4096 layer spreads thin)."""
    torch.manual_seed(0)
    q = quantize_linear(nn.Linear(4096, 4096, bias=False), QuantizeConfig())
    storage = measure_storage(q)
    assert storage.quantized_weights == 4096 * 4096
    # + one float32 offset of the scales
    assert storage.bits_per_quantized_weight == pytest.approx(
        4 + 8 / 64 + 32 / (64 * 256), abs=1e-5
    )
    assert storage.code_book_bytes == (16 + 256) * 4
    bits = storage.bits_with_code_books
    assert bits is not None and 4.127 < bits <= 4.13, bits
    assert storage.total_bytes == storage.quantized_bytes


def test_layers_share_one_copy_of_the_code_books() -> None:
    """bitsandbytes makes two constant tables per layer; after `quantize_model` every layer
    holds the same two tensors, and the storage counts them once."""
    model = helpers.tiny_llama(0)
    per_layer = copy.deepcopy(model)
    for name, module in list(per_layer.named_modules()):
        if isinstance(module, nn.Linear) and name != "lm_head":
            parent, _, child = name.rpartition(".")
            setattr(
                per_layer.get_submodule(parent), child, quantize_linear(module, QuantizeConfig())
            )
    quantize_model(model)
    weights = [getattr(m, "weight", None) for m in model.modules()]
    states = [w.quant_state for w in weights if hasattr(w, "quant_state")]
    assert len(states) == 14
    assert len({id(s.code) for s in states}) == len({id(s.state2.code) for s in states}) == 1
    shared, separate = measure_storage(model), measure_storage(per_layer)
    assert shared.code_book_bytes == (16 + 256) * 4
    assert separate.code_book_bytes == 14 * (16 + 256) * 4
    assert separate.total_bytes - shared.total_bytes == 13 * (16 + 256) * 4
    ids = torch.arange(12).view(2, 6)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, per_layer(ids).logits, rtol=0, atol=0)


# -- LoRA over a quantized base ------------------------------------------------------------


CASES = [
    ("nf4", torch.float32, True),
    ("nf4", torch.float32, False),
    ("nf4", torch.bfloat16, True),
    ("nf4", torch.bfloat16, False),
    ("fp4", torch.float32, True),
]


@pytest.mark.parametrize(("fmt", "compute", "grad"), CASES)
def test_lora_over_4bit_equals_lora_over_dequantized(
    fmt: str, compute: torch.dtype, grad: bool
) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(96, 80)
    q = quantize_linear(linear, QuantizeConfig(fmt, compute_dtype=compute))
    plain = nn.Linear(96, 80)
    with torch.no_grad():
        plain.weight.copy_(dequantize_weight(q))
        plain.bias.copy_(q.bias)
    layers = [LoraLinear(q), LoraLinear(plain.to(compute))]
    for layer in layers:
        layer.add_adapter("a", 0, AdapterSpec(r=4, alpha=8))
        layer.active = ["a"]
    torch.manual_seed(1)
    a, b = torch.randn(4, 96) * 0.3, torch.randn(80, 4) * 0.3
    for layer in layers:
        with torch.no_grad():
            layer.lora_A["a"].copy_(a)
            layer.lora_B["a"].copy_(b)
    x = torch.randn(3, 5, 96).to(compute)
    with torch.set_grad_enabled(grad):
        out_q, out_plain = layers[0](x), layers[1](x)
    assert out_q.dtype == compute
    close(out_q, out_plain, compute)
    expected = lora_ref.linear(x, plain.weight, plain.bias, a, b, 2.0)
    close(out_q, expected, compute)
    if grad and compute == torch.float32:  # gradients reach the adapter through the 4-bit layer
        out_q.square().sum().backward()
        out_plain.square().sum().backward()
        for store in ("lora_A", "lora_B"):
            grads = [getattr(layer, store)["a"].grad for layer in layers]
            torch.testing.assert_close(grads[0], grads[1], atol=1e-3, rtol=1e-4)


def test_model_single_mixed_batch_and_generate_equal_the_dequantized_model() -> None:
    model, reference = quantized_and_reference()
    adapted = []
    for base in (model, reference):
        m = get_peft_model(base, helpers.lora(target_modules="all-linear"), adapter_name="a")
        m.add_adapter("b", helpers.lora(r=2, target_modules=["q_proj", "o_proj"]))
        m.add_adapter("c", helpers.lora(r=4, use_rslora=True, rank_pattern={"v_proj": 8}))
        m.set_adapter("a")
        randomize(m)
        adapted.append(m)
    ids = helpers.tokens(batch=4)
    with torch.no_grad():
        for names in (None, ["a", "b", BASE, "c"]):
            out = [m(ids, adapter_names=names).logits for m in adapted]
            close(out[0], out[1], torch.float32)
        # a mixed batch equals each row run alone with its own adapter
        mixed = adapted[0](ids, adapter_names=["a", "b", BASE, "c"]).logits
        for row, name in enumerate(["a", "b", BASE, "c"]):
            if name == BASE:
                with adapted[0].disable_adapter():
                    alone = adapted[0](ids[row : row + 1]).logits
            else:
                adapted[0].set_adapter(name)
                alone = adapted[0](ids[row : row + 1]).logits
            close(mixed[row : row + 1], alone, torch.float32)
        adapted[0].set_adapter("a")
        generated = [
            m.generate(ids, max_new_tokens=5, do_sample=False, adapter_names=["a", "b", "c", "a"])
            for m in adapted
        ]
    assert torch.equal(generated[0], generated[1])


def test_dora_over_4bit_equals_dora_over_dequantized() -> None:
    model, reference = quantized_and_reference()
    adapted = []
    for base in (model, reference):
        m = get_peft_model(base, helpers.lora(use_dora=True, target_modules=["q_proj", "up_proj"]))
        randomize(m)
        adapted.append(m)
    layer = adapted[0].base_model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoraLinear) and layer.specs["default"].variant is DORA
    ids = helpers.tokens()
    with torch.no_grad():
        out = [m(ids).logits for m in adapted]
    close(out[0], out[1], torch.float32)


def test_merge_into_4bit_is_refused_unless_asked_and_unmerge_is_exact() -> None:
    model, _ = quantized_and_reference()
    adapted = get_peft_model(model, helpers.lora(target_modules="all-linear"))
    randomize(adapted)
    q_proj = adapted.base_model.model.layers[0].self_attn.q_proj
    original = q_proj.weight
    packed = original.detach().clone()
    ids = helpers.tokens()
    with torch.no_grad():
        unmerged = adapted(ids).logits
    with pytest.raises(RequantizeError, match="re-quantizes"):
        adapted.merge_adapter()
    assert q_proj.merged == [] and q_proj.weight is original
    with allow_requantize():
        adapted.merge_adapter()
    assert q_proj.merged == ["default"] and q_proj.weight is not original
    with torch.no_grad():
        merged = adapted(ids).logits
    assert float((merged - unmerged).abs().max()) > 0  # re-quantizing moves the outputs
    adapted.unmerge_adapter()
    assert q_proj.weight is original and torch.equal(q_proj.weight, packed)
    with torch.no_grad():
        torch.testing.assert_close(adapted(ids).logits, unmerged, atol=0, rtol=0)


def test_dense_weight_of_a_plain_layer_is_the_weight_itself() -> None:
    linear = nn.Linear(4, 3)
    assert dense_weight(linear) is linear.weight


# -- what is quantized, and the errors ------------------------------------------------------


class _ScaledLinear(nn.Linear):
    """A linear subclass with its own forward: tilpass must not quantize it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


def test_unknown_linear_types_are_skipped_and_counted_and_the_head_is_kept() -> None:
    model = helpers.tiny_llama()
    mlp = model.model.layers[0].mlp
    custom = _ScaledLinear(32, 64)
    mlp.up_proj = custom
    report = quantize_model(model)
    assert mlp.up_proj is custom
    assert report.skipped == {"model.layers.0.mlp.up_proj": "_ScaledLinear"}
    assert report.kept == ["lm_head"] and type(model.lm_head) is nn.Linear
    assert len(report.quantized) == 13
    assert "skipped 1 module(s)" in report.summary() and "4-bit NF4" in report.summary()


def test_missing_bitsandbytes_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import raises ImportError
    with pytest.raises(QuantizationError, match="pip install bitsandbytes"):
        quantize_model(helpers.tiny_llama())


def test_int8_base_trains_an_adapter_or_says_it_is_not_supported_here() -> None:
    model = helpers.tiny_llama()
    try:
        report = quantize_model(model, QuantizeConfig("int8"))
    except QuantizationError as exc:
        assert "not supported on this device" in str(exc)
        return
    assert len(report.quantized) == 14 and "int8" in report.summary()
    adapted = get_peft_model(model, helpers.lora())
    adapted.train()
    adapted(helpers.tokens(), labels=helpers.tokens()).loss.backward()
    grads = [p.grad for p in adapted.parameters() if p.requires_grad]
    assert all(g is not None and bool(g.abs().sum() > 0) for g in grads)


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="nf4, fp4, int8"):
        QuantizeConfig("nf3")
