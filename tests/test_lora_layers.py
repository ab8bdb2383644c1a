"""LoRA layers against the float64 references, and the layer invariants."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from tests.reference import lora_ref
from tilpass.layers import AdapterLayer
from tilpass.methods.lora import AdapterSpec, LoraEmbedding, LoraLinear, make_layer
from tilpass.methods.lora.dora import DORA
from tilpass.methods.lora.fused import LoraLinearFunction
from tilpass.routing import Routing, routed

# One tolerance table for every comparison: (atol, rtol) per dtype.
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 2e-5), torch.bfloat16: (3e-2, 3e-2)}


def add(layer: AdapterLayer, name: str, spec: AdapterSpec) -> None:
    """Add an adapter with the next free id, as the model would."""
    layer.add_adapter(name, max(layer.ids.values(), default=-1) + 1, spec)


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol)


def randomize(layer: LoraLinear | LoraEmbedding, name: str) -> None:
    """Non-zero A and B so no test can pass with a zero update."""
    with torch.no_grad():
        layer.lora_a[name].normal_(0, 0.3)
        layer.lora_b[name].normal_(0, 0.3)


def linear_layer(
    dtype: torch.dtype, bias: bool = True, spec: AdapterSpec | None = None
) -> LoraLinear:
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(12, 10, bias=bias, dtype=dtype))
    add(layer, "a", spec or AdapterSpec(r=4, alpha=8))
    randomize(layer, "a")
    layer.active = ["a"]
    return layer


# The layers take different paths with and without autograd (no-grad forwards use cached
# transposed operands and one fused GEMM); every path is checked against the reference.
GRAD_MODES = {
    "grad": torch.enable_grad,
    "no_grad": torch.no_grad,
    "inference_mode": torch.inference_mode,
}


@pytest.mark.parametrize("mode", GRAD_MODES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rslora", [False, True])
def test_linear_matches_reference(dtype: torch.dtype, bias: bool, rslora: bool, mode: str) -> None:
    layer = linear_layer(dtype, bias, AdapterSpec(r=4, alpha=8, use_rslora=rslora))
    x = torch.randn(3, 5, 12, dtype=dtype)
    scale = 8 / (math.sqrt(4) if rslora else 4)
    assert layer.specs["a"].scale == scale
    expected = lora_ref.linear(
        x, layer.weight, layer.bias, layer.lora_A["a"], layer.lora_B["a"], scale
    )
    with GRAD_MODES[mode]():
        close(layer(x), expected, dtype)


def test_no_grad_forward_sees_adapters_changed_in_place_or_replaced() -> None:
    """The no-grad path caches transposed A and B; an update must never serve stale ones."""
    layer = linear_layer(torch.float64)
    x = torch.randn(2, 12, dtype=torch.float64)

    def expected() -> torch.Tensor:
        a, b = layer.lora_A["a"], layer.lora_B["a"]
        return lora_ref.linear(x, layer.weight, layer.bias, a, b, 2.0)

    with torch.no_grad():
        close(layer(x), expected(), torch.float64)
        layer.lora_B["a"].mul_(-3)  # as an optimizer step or a reload does
        close(layer(x), expected(), torch.float64)
        layer.lora_A["a"].add_(1)
        close(layer(x), expected(), torch.float64)
        layer.lora_B["a"] = nn.Parameter(torch.randn(10, 4, dtype=torch.float64))
        close(layer(x), expected(), torch.float64)


@pytest.mark.parametrize("mode", GRAD_MODES)
def test_several_active_adapters_match_the_reference_sum(mode: str) -> None:
    layer = linear_layer(torch.float64)
    add(layer, "b", AdapterSpec(r=2, alpha=3))
    randomize(layer, "b")
    layer.active = ["a", "b"]
    x = torch.randn(4, 12, dtype=torch.float64)
    a_only = lora_ref.linear(x, layer.weight, layer.bias, layer.lora_A["a"], layer.lora_B["a"], 2.0)
    b_delta = lora_ref.linear(x, layer.weight, None, layer.lora_A["b"], layer.lora_B["b"], 1.5)
    b_delta = b_delta - x.double() @ layer.weight.double().T
    with GRAD_MODES[mode]():
        close(layer(x), a_only + b_delta, torch.float64)


@pytest.mark.parametrize("mode", GRAD_MODES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_conv1d_matches_reference(dtype: torch.dtype, mode: str) -> None:
    torch.manual_seed(0)
    base = Conv1D(10, 12).to(dtype)  # nf=out=10, nx=in=12: weight (12, 10)
    with torch.no_grad():
        base.bias.normal_()
    layer = make_layer(base)
    assert isinstance(layer, LoraLinear) and layer.transposed
    add(layer, "a", AdapterSpec(r=4, alpha=8))
    randomize(layer, "a")
    layer.active = ["a"]
    x = torch.randn(2, 3, 12, dtype=dtype)
    expected = lora_ref.conv1d(
        x, layer.weight, layer.bias, layer.lora_A["a"], layer.lora_B["a"], 2.0
    )
    with GRAD_MODES[mode]():
        close(layer(x), expected, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_embedding_matches_reference(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    layer = LoraEmbedding(nn.Embedding(30, 8, dtype=dtype))
    add(layer, "a", AdapterSpec(r=4, alpha=4))
    randomize(layer, "a")
    layer.active = ["a"]
    ids = torch.randint(0, 30, (3, 6))
    a, b = layer.lora_embedding_A["a"], layer.lora_embedding_B["a"]
    close(layer(ids), lora_ref.embedding(ids, layer.weight, a, b, 1.0), dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dora_matches_reference(dtype: torch.dtype) -> None:
    layer = linear_layer(dtype, True, AdapterSpec(r=4, alpha=8, variant=DORA))
    with torch.no_grad():
        layer.lora_magnitude_vector["a"].uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 12, dtype=dtype)
    a, b, m = layer.lora_A["a"], layer.lora_B["a"], layer.lora_magnitude_vector["a"]
    close(layer(x), lora_ref.dora(x, layer.weight, layer.bias, a, b, 2.0, m), dtype)


def test_dora_magnitude_starts_at_row_norms() -> None:
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(12, 10, dtype=torch.float64))
    add(layer, "a", AdapterSpec(r=4, alpha=8, variant=DORA, init=False))
    a, b = layer.lora_A["a"], layer.lora_B["a"]
    close(
        layer.lora_magnitude_vector["a"],
        lora_ref.dora_magnitude_init(layer.weight, a, b, 2.0),
        torch.float64,
    )


def test_init_modes() -> None:
    layer = LoraLinear(nn.Linear(64, 32))
    add(layer, "kaiming", AdapterSpec(r=8, alpha=8, init=True))
    add(layer, "gauss", AdapterSpec(r=8, alpha=8, init="gaussian"))
    add(layer, "random", AdapterSpec(r=8, alpha=8, init=False))
    assert torch.count_nonzero(layer.lora_B["kaiming"]) == 0
    assert torch.count_nonzero(layer.lora_B["gauss"]) == 0
    assert torch.count_nonzero(layer.lora_B["random"]) == layer.lora_B["random"].numel()
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=sqrt(5)) bound for fan_in 64
    assert layer.lora_A["kaiming"].abs().max() <= bound
    assert abs(layer.lora_A["gauss"].std().item() - 1 / 8) < 0.03
    emb = LoraEmbedding(nn.Embedding(20, 6))
    add(emb, "default", AdapterSpec(r=4, alpha=4))
    assert torch.count_nonzero(emb.lora_embedding_A["default"]) == 0  # PEFT: A zero, B normal
    assert torch.count_nonzero(emb.lora_embedding_B["default"]) == 24


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["linear", "conv1d", "embedding", "dora"])
def test_merge_equals_unmerged_and_unmerge_restores(dtype: torch.dtype, kind: str) -> None:
    torch.manual_seed(0)
    if kind == "embedding":
        layer = LoraEmbedding(nn.Embedding(30, 8, dtype=dtype))
        x = torch.randint(0, 30, (3, 6))
    else:
        base = Conv1D(10, 12).to(dtype) if kind == "conv1d" else nn.Linear(12, 10, dtype=dtype)
        layer = make_layer(base)
        x = torch.randn(3, 5, 12, dtype=dtype)
    add(layer, "a", AdapterSpec(r=4, alpha=8, variant=DORA if kind == "dora" else None))
    add(layer, "b", AdapterSpec(r=2, alpha=3))
    randomize(layer, "a")
    randomize(layer, "b")
    layer.active = ["a", "b"]  # merging while several adapters are active merges all of them
    original = layer.weight.detach().clone()
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        layer.merge()  # idempotent
        assert layer.merged == ["a", "b"]
        merged = layer(x)
        assert not torch.equal(layer.weight, original)
        layer.unmerge()
        layer.unmerge()
    close(merged, unmerged, dtype)
    close(layer.weight, original, dtype)
    assert layer.merged == []


def test_disabled_is_base_bit_for_bit() -> None:
    torch.manual_seed(0)
    for base, x in [
        (nn.Linear(12, 10), torch.randn(4, 12)),
        (Conv1D(10, 12), torch.randn(2, 3, 12)),
        (nn.Embedding(30, 8, padding_idx=0), torch.randint(0, 30, (3, 5))),
    ]:
        expected = base(x)
        layer = make_layer(base)
        add(layer, "a", AdapterSpec(r=4, alpha=8, init=False))
        layer.active = ["a"]
        assert not torch.equal(layer(x), expected)
        layer.disabled = True
        assert torch.equal(layer(x), expected)


def test_base_weight_keeps_its_key_and_unwrap_restores_module() -> None:
    base = nn.Linear(12, 10)
    weight = base.weight
    layer = LoraLinear(base)
    add(layer, "a", AdapterSpec(r=4, alpha=8))
    keys = set(layer.state_dict())
    assert {"weight", "bias", "lora_A.a", "lora_B.a"} == keys
    restored = layer.unwrap()
    assert restored is base and restored.weight is weight
    assert set(restored.state_dict()) == {"weight", "bias"}


def test_gradients_reach_only_adapter_parameters() -> None:
    layer = linear_layer(torch.float32)
    layer.weight.requires_grad_(False)
    layer.bias.requires_grad_(False)
    layer(torch.randn(4, 12)).pow(2).sum().backward()
    assert layer.weight.grad is None and layer.bias.grad is None
    assert layer.lora_A["a"].grad is not None and layer.lora_A["a"].grad.abs().sum() > 0
    assert layer.lora_B["a"].grad is not None and layer.lora_B["a"].grad.abs().sum() > 0


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dropped", [False, True])
@pytest.mark.parametrize("scale", [2.0, 1.0])
def test_fused_autograd_node_passes_gradcheck(bias: bool, dropped: bool, scale: float) -> None:
    """The one-node LoRA forward/backward against finite differences, in float64."""
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int, grad: bool = True) -> torch.Tensor:
        t = torch.randn(*shape, dtype=torch.float64, generator=gen)
        return t.requires_grad_(grad)

    x, a, b = rand(2, 3, 5), rand(2, 5), rand(4, 2)
    xd = rand(2, 3, 5) if dropped else x
    w_t = rand(5, 4, grad=False)
    bias_t = rand(4, grad=False) if bias else None
    inputs = (x, xd, a, b, w_t, bias_t, scale)
    assert torch.autograd.gradcheck(lambda *t: LoraLinearFunction.apply(*t), inputs)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("bias", [True, False])
def test_training_gradients_match_the_reference(kind: str, bias: bool) -> None:
    """Gradients of x, A and B from a frozen-base layer equal autograd over the float64
    reference formula (the layer takes its one-node path here)."""
    torch.manual_seed(0)
    base = nn.Linear(12, 10, bias=bias) if kind == "linear" else Conv1D(10, 12)
    layer = make_layer(base.double().requires_grad_(False))
    add(layer, "a", AdapterSpec(r=4, alpha=8))
    randomize(layer, "a")
    layer.active = ["a"]
    x = torch.randn(3, 4, 12, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(3, 4, 10, dtype=torch.float64)
    out = layer(x)
    assert type(out.grad_fn).__name__ == "LoraLinearFunctionBackward"  # the one-node path
    (out * weights).sum().backward()

    a = layer.lora_A["a"].detach().requires_grad_(True)
    b = layer.lora_B["a"].detach().requires_grad_(True)
    x_ref = x.detach().requires_grad_(True)
    formula = lora_ref.linear if kind == "linear" else lora_ref.conv1d
    bias_t = layer.bias if kind == "conv1d" or bias else None
    (formula(x_ref, layer.weight, bias_t, a, b, 2.0) * weights).sum().backward()
    close(x.grad, x_ref.grad, torch.float64)
    close(layer.lora_A["a"].grad, a.grad, torch.float64)
    close(layer.lora_B["a"].grad, b.grad, torch.float64)
    assert layer.weight.grad is None


def test_dropout_applies_in_training_only() -> None:
    layer = linear_layer(torch.float64, True, AdapterSpec(r=4, alpha=8, dropout=0.5))
    x = torch.randn(6, 12, dtype=torch.float64)
    layer.eval()
    expected = lora_ref.linear(
        x, layer.weight, layer.bias, layer.lora_A["a"], layer.lora_B["a"], 2.0
    )
    close(layer(x), expected, torch.float64)
    layer.train()
    torch.manual_seed(3)
    trained = layer(x)
    assert not torch.allclose(trained, expected)
    torch.manual_seed(3)
    keep = torch.nn.functional.dropout(torch.ones_like(x), 0.5, True)
    expected_dropped = (
        x @ layer.weight.T
        + layer.bias
        + 2.0 * ((x * keep) @ layer.lora_A["a"].T) @ layer.lora_B["a"].T
    )
    close(trained, expected_dropped, torch.float64)


def test_unsupported_module_type_is_named() -> None:
    with pytest.raises(TypeError, match="LayerNorm"):
        make_layer(nn.LayerNorm(4))


def test_per_token_routing_with_adapters_of_different_ranks() -> None:
    """Tokens of one row may use different adapters (packed ragged batches); each rank runs
    its own batched matmuls, and every token equals its adapter applied alone."""
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(12, 10, dtype=torch.float64))
    add(layer, "a", AdapterSpec(r=4, alpha=8, init=False))
    add(layer, "b", AdapterSpec(r=8, alpha=4, init=False))
    add(layer, "c", AdapterSpec(r=4, alpha=2, init=False))
    x = torch.randn(2, 7, 12, dtype=torch.float64)
    ids = torch.tensor([[0, 0, 1, 1, 1, -1, 2], [2, 1, 0, 0, -1, -1, 1]])
    alone = {}
    for adapter_id, name in enumerate(["a", "b", "c"]):
        layer.active = [name]
        alone[adapter_id] = layer(x)
    layer.active = []
    alone[-1] = layer(x)
    with routed(Routing(ids)):
        mixed = layer(x)
    expected = torch.stack(
        [torch.stack([alone[int(ids[i, t])][i, t] for t in range(7)]) for i in range(2)]
    )
    torch.testing.assert_close(mixed, expected, atol=1e-12, rtol=1e-12)
    stacks = layer.stacks(torch.float64)
    assert [s.a_t.shape[-1] for s in stacks] == [4, 8]  # r=4 adapters do not pay for r=8
