"""LoRA (and DoRA, lora_bias) on nn.Conv1d / Conv2d / Conv3d: float64 references, the layer
invariants, mixed batches, and PEFT parity (outputs and files, both ways)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import tilpass
from tests.parity import peft_both_ways, perturb
from tests.reference import lora_ref
from tilpass.methods.lora import AdapterSpec, LoraConv, make_layer
from tilpass.methods.lora.dora import DORA

CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
TOL64 = {"atol": 1e-10, "rtol": 1e-10}


def conv_layer(dims: int, bias: bool = True, **spec_kw: object) -> tuple[nn.Module, LoraConv]:
    torch.manual_seed(dims)
    base = CONVS[dims](4, 6, 3, stride=2, padding=1, bias=bias, dtype=torch.float64)
    layer = make_layer(base)
    assert isinstance(layer, LoraConv)
    layer.add_adapter("a", 0, AdapterSpec(**{"r": 4, "alpha": 8, "init": False, **spec_kw}))
    perturb(layer.adapter_parameters("a"), seed=dims)
    layer.active = ["a"]
    return base, layer


def sample(dims: int, batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 4, *(7,) * dims, dtype=torch.float64)


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_matches_the_weight_delta_reference(dims: int, bias: bool) -> None:
    base, layer = conv_layer(dims, bias)
    x = sample(dims)
    t = layer.adapter_tensors("a")
    scale = layer.specs["a"].scale
    expected = lora_ref.conv(
        x, base.weight, base.bias, t["lora_A.weight"], t["lora_B.weight"], scale, 2, 1
    )
    assert not torch.allclose(expected, base(x))
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            torch.testing.assert_close(layer(x), expected, **TOL64)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_conv_merge_unmerge_and_disable(dims: int) -> None:
    base, layer = conv_layer(dims, lora_bias=True)
    x = sample(dims)
    original = base.weight.detach().clone(), base.bias.detach().clone()
    unmerged = layer(x)
    layer.merge()
    torch.testing.assert_close(base(x), unmerged, **TOL64)  # the plain module, merged
    layer.unmerge()
    torch.testing.assert_close(base.weight, original[0], **TOL64)
    torch.testing.assert_close(base.bias, original[1], **TOL64)
    layer.disabled = True
    assert torch.equal(layer(x), base(x))


def test_lora_bias_on_conv_adds_the_scaled_bias() -> None:
    base, layer = conv_layer(2, lora_bias=True)
    x = sample(2)
    t = layer.adapter_tensors("a")
    scale = layer.specs["a"].scale
    assert set(t) == {"lora_A.weight", "lora_B.weight", "lora_B.bias"}
    expected = lora_ref.conv(
        x,
        base.weight,
        base.bias + scale * t["lora_B.bias"],
        t["lora_A.weight"],
        t["lora_B.weight"],
        scale,
        2,
        1,
    )
    torch.testing.assert_close(layer(x), expected, **TOL64)


def test_grouped_conv_uses_a_grouped_1x1_b_and_refuses_to_merge() -> None:
    torch.manual_seed(0)
    base = nn.Conv1d(4, 6, 3, groups=2, dtype=torch.float64)
    layer = make_layer(base)
    layer.add_adapter("a", 0, AdapterSpec(r=4, alpha=8, init=False))
    perturb(layer.adapter_parameters("a"), seed=1)
    layer.active = ["a"]
    t = layer.adapter_tensors("a")
    assert t["lora_A.weight"].shape == (4, 4, 3) and t["lora_B.weight"].shape == (6, 2, 1)
    x = sample(1)
    expected = lora_ref.conv_grouped(
        x, base.weight, base.bias, t["lora_A.weight"], t["lora_B.weight"], 2.0, 2
    )
    torch.testing.assert_close(layer(x), expected, **TOL64)
    with pytest.raises(NotImplementedError, match="groups > 1"):
        layer.merge()
    with pytest.raises(ValueError, match="divisible by groups"):
        layer.add_adapter("b", 1, AdapterSpec(r=3, alpha=8))


@pytest.mark.parametrize("groups", [2, 4])
def test_dora_on_a_grouped_conv_matches_peft_s_definition(groups: int) -> None:
    torch.manual_seed(0)
    base = nn.Conv1d(4, 8, 3, groups=groups, dtype=torch.float64)
    layer = make_layer(base)
    layer.add_adapter("a", 0, AdapterSpec(r=4, alpha=8, init=False, variant=DORA))
    t = layer.adapter_tensors("a")
    scale = layer.specs["a"].scale
    norm = lora_ref.grouped_dora_norm(base.weight, t["lora_A.weight"], t["lora_B.weight"], scale)
    torch.testing.assert_close(  # the magnitude starts as PEFT's norm, so DoRA starts at LoRA
        t["lora_magnitude_vector"], norm.view(1, -1, 1), **TOL64
    )
    perturb(layer.adapter_parameters("a"), seed=4)
    layer.active = ["a"]
    x = sample(1)
    args = (t["lora_A.weight"], t["lora_B.weight"], scale, t["lora_magnitude_vector"])
    expected = lora_ref.dora_conv_grouped(x, base.weight, base.bias, *args, groups)
    assert not torch.allclose(expected, base(x))
    torch.testing.assert_close(layer(x), expected, **TOL64)
    with pytest.raises(NotImplementedError, match="groups > 1"):
        layer.merge()


class GroupedConvNet(nn.Module):
    """A grouped conv (groups 2) -> ReLU -> flatten -> linear, for the PEFT parity check."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1, groups=2)
        self.lin = nn.Linear(8 * 5 * 5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(torch.relu(self.conv(x)).flatten(1))


def test_dora_on_a_grouped_conv_peft_parity_both_ways(tmp_path: Path) -> None:
    pytest.importorskip("peft")

    def make() -> nn.Module:
        torch.manual_seed(0)
        return GroupedConvNet().eval()

    settings = {"r": 4, "target_modules": ["conv"], "use_dora": True, "init_lora_weights": False}
    peft_both_ways(make, settings, conv_input(2), tmp_path)


def test_dora_on_conv_matches_the_reference_and_merges() -> None:
    torch.manual_seed(0)
    base = nn.Conv2d(4, 6, 3, padding=1, dtype=torch.float64)
    layer = make_layer(base)
    layer.add_adapter("a", 0, AdapterSpec(r=4, alpha=8, init=False, variant=DORA))
    perturb(layer.adapter_parameters("a"), seed=3)
    layer.active = ["a"]
    t = layer.adapter_tensors("a")
    assert t["lora_magnitude_vector"].shape == (1, 6, 1, 1)  # PEFT's layout
    x = sample(2)
    scale = layer.specs["a"].scale
    args = (t["lora_A.weight"], t["lora_B.weight"], scale, t["lora_magnitude_vector"])
    expected = lora_ref.dora_conv(x, base.weight, base.bias, *args, padding=1)
    torch.testing.assert_close(layer(x), expected, **TOL64)
    layer.merge()
    torch.testing.assert_close(base(x), expected, **TOL64)
    layer.unmerge()
    torch.testing.assert_close(layer(x), expected, **TOL64)


class ConvNet(nn.Module):
    """conv (stride 2, padding 1) -> ReLU -> 1 x 1 conv -> flatten -> linear."""

    def __init__(self, dims: int) -> None:
        super().__init__()
        self.dims = dims
        self.conv = CONVS[dims](4, 6, 3, stride=2, padding=1)
        self.conv2 = CONVS[dims](6, 6, 1)
        self.lin = nn.Linear(6 * 3**dims, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(torch.relu(self.conv(x)))
        return self.lin(h.flatten(1))


def convnet(dims: int) -> ConvNet:
    torch.manual_seed(0)
    return ConvNet(dims).eval()


def conv_input(dims: int, batch: int = 6) -> torch.Tensor:
    return torch.randn(batch, 4, *(5,) * dims, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize(
    "extra", [{}, {"lora_bias": True}, {"use_dora": True}], ids=["lora", "lora_bias", "dora"]
)
def test_conv_peft_parity_both_ways(dims: int, extra: dict, tmp_path: Path) -> None:
    pytest.importorskip("peft")
    settings = {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["conv", "conv2"],
        "init_lora_weights": False,
    }
    peft_both_ways(lambda: convnet(dims), {**settings, **extra}, conv_input(dims), tmp_path)


@pytest.mark.parametrize("dims", [1, 2])
def test_conv_mixed_batch_rows_equal_single_adapter_runs(dims: int) -> None:
    model = tilpass.get_peft_model(
        convnet(dims), tilpass.LoraConfig(target_modules=["conv", "conv2"], init_lora_weights=False)
    ).eval()
    model.add_adapter(
        "other",
        tilpass.LoraConfig(target_modules=["conv"], r=16, lora_bias=True, init_lora_weights=False),
    )
    perturb(model.adapter_parameters("other"), seed=5)
    x = conv_input(dims)
    names = ["__base__", "default", "other"] * 2
    with torch.no_grad():
        mixed = model(x, adapter_names=names)
        with model.disable_adapter():
            expected = {"__base__": model(x)}
        for name in ("default", "other"):
            model.set_adapter(name)
            expected[name] = model(x)
    for row, name in enumerate(names):
        assert torch.allclose(mixed[row], expected[name][row]), (row, name)
