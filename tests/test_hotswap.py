"""PEFT's hot-swapping on tilpass: `hotswap_adapter` and `prepare_model_for_compiled_hotswap`.

A swapped model must compute what a model freshly loaded with the new adapter computes (whole
output tensors), and what PEFT's own hot-swap gives on the same files; the Parameter objects
stay the same ones.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import tilpass

os.environ.setdefault("HF_HUB_OFFLINE", "1")
peft = pytest.importorskip("peft")
from peft.utils import hotswap as peft_hotswap  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:LoRA rank:UserWarning"),
    pytest.mark.filterwarnings("ignore:adapter .* MiB:UserWarning"),
]

X = torch.linspace(-1, 1, 30).reshape(3, 10)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 12)
        self.lin1 = nn.Linear(12, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(x)))


def base() -> MLP:
    torch.manual_seed(0)
    return MLP().eval()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Adapters of different ranks and alphas (non-zero B), saved by tilpass."""
    root = tmp_path_factory.mktemp("hotswap")
    out = {}
    for name, (r, alpha, targets) in {
        "r4": (4, 8, ["lin0", "lin1"]),
        "r6": (6, 3, ["lin0", "lin1"]),
        "lin0": (4, 8, ["lin0"]),
    }.items():
        torch.manual_seed(len(out) + 1)
        config = tilpass.LoraConfig(
            r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False
        )
        tilpass.get_peft_model(base(), config).save_pretrained(root / name)
        out[name] = root / name
    return out


def loaded(directory: Path) -> tilpass.AdaptedModel:
    return tilpass.PeftModel.from_pretrained(base(), directory)


def outputs(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(X)


@pytest.mark.parametrize(("first", "second"), [("r4", "r6"), ("r6", "r4")])
@pytest.mark.parametrize("prepare", [False, True])
def test_swapped_model_equals_a_fresh_load_and_peft(
    adapters: dict[str, Path], first: str, second: str, prepare: bool
) -> None:
    model = loaded(adapters[first])
    if prepare:
        tilpass.prepare_model_for_compiled_hotswap(model, target_rank=6)
        torch.testing.assert_close(outputs(model), outputs(loaded(adapters[first])))
    params = [id(p) for p in model.parameters()]
    tilpass.hotswap_adapter(model, adapters[second], adapter_name="default")
    assert [id(p) for p in model.parameters()] == params  # the same Parameter objects
    expected = outputs(loaded(adapters[second]))
    torch.testing.assert_close(outputs(model), expected)
    theirs = peft.PeftModel.from_pretrained(base(), adapters[first])
    if prepare:
        peft_hotswap.prepare_model_for_compiled_hotswap(theirs, target_rank=6)
    peft_hotswap.hotswap_adapter(theirs, str(adapters[second]), adapter_name="default")
    torch.testing.assert_close(outputs(theirs), outputs(model))


def test_a_missing_module_is_zeroed(adapters: dict[str, Path]) -> None:
    model = loaded(adapters["r4"])
    tilpass.hotswap_adapter(model, adapters["lin0"], adapter_name="default")
    lin1 = model.get_base_model().lin1
    assert not lin1.lora_A["default"].any() and not lin1.lora_B["default"].any()
    with_lin0_only = tilpass.get_peft_model(base(), tilpass.LoraConfig(target_modules=["lin0"]))
    with_lin0_only.load_adapter(adapters["lin0"], "x")
    with_lin0_only.set_adapter("x")
    torch.testing.assert_close(outputs(model), outputs(with_lin0_only))


def test_an_extra_key_is_refused_before_anything_changes(
    adapters: dict[str, Path], tmp_path: Path
) -> None:
    directory = tmp_path / "extra"
    tilpass.get_peft_model(
        base(), tilpass.LoraConfig(r=4, lora_alpha=8, target_modules=["lin0"])
    ).save_pretrained(directory)
    tensors = load_file(directory / "adapter_model.safetensors")
    tensors["base_model.model.lin1.lora_A.weight"] = torch.zeros(4, 12)
    save_file(tensors, directory / "adapter_model.safetensors", metadata={"format": "pt"})
    model = loaded(adapters["lin0"])
    before = outputs(model)
    message = "unexpected keys found: base_model.model.lin1.lora_A.default.weight"
    with pytest.raises(RuntimeError, match=re.escape(message)):
        tilpass.hotswap_adapter(model, directory, adapter_name="default")
    torch.testing.assert_close(outputs(model), before)


def test_refusals(adapters: dict[str, Path]) -> None:
    model = loaded(adapters["r6"])
    with pytest.raises(
        ValueError, match=re.escape("target rank 4, but the original rank is larger (6)")
    ):
        tilpass.prepare_model_for_compiled_hotswap(model, target_rank=4)
    with pytest.raises(ValueError, match="No adapter layers found"):
        tilpass.prepare_model_for_compiled_hotswap(base(), target_rank=8)
    model.merge_adapter()
    with pytest.raises(ValueError, match="currently merged"):
        tilpass.hotswap_adapter(model, adapters["r4"], adapter_name="default")
    other = tilpass.get_peft_model(
        base(), tilpass.LoraConfig(target_modules=["lin0"], use_rslora=True)
    )
    with pytest.raises(ValueError, match="Configs are incompatible: for use_rslora"):
        tilpass.hotswap_adapter(other, adapters["lin0"], adapter_name="default")


def test_prepare_updates_the_configs(adapters: dict[str, Path]) -> None:
    model = loaded(adapters["r4"])
    config = model.peft_config["default"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tilpass.prepare_model_for_compiled_hotswap(model, target_rank=8, config=model.peft_config)
    assert config.r == 8
    layer = model.get_base_model().lin0
    assert layer.lora_A["default"].shape == (8, 10) and layer.lora_B["default"].shape == (12, 8)
    torch.testing.assert_close(outputs(model), outputs(loaded(adapters["r4"])))


class GroupedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, groups=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


@pytest.mark.parametrize("prepare", [False, True])
def test_grouped_convolution_swaps_ranks_block_by_block(tmp_path: Path, prepare: bool) -> None:
    """A grouped convolution's A rows come in one block per group: a rank-2 adapter swapped
    into a rank-6 one (or padded to it) keeps each group's rows in that group's block."""
    x = torch.linspace(-1, 1, 2 * 4 * 5 * 5).reshape(2, 4, 5, 5)
    dirs = {}
    for r in (2, 6):
        torch.manual_seed(r)
        config = tilpass.LoraConfig(
            r=r, lora_alpha=r + 1, target_modules=["conv"], init_lora_weights=False
        )
        torch.manual_seed(0)
        model = tilpass.get_peft_model(GroupedConv(), config)
        model.save_pretrained(tmp_path / f"r{r}")
        dirs[r] = tmp_path / f"r{r}"

    def fresh(directory: Path) -> nn.Module:
        torch.manual_seed(0)
        return tilpass.PeftModel.from_pretrained(GroupedConv(), directory).eval()

    model = fresh(dirs[2])
    if prepare:
        tilpass.prepare_model_for_compiled_hotswap(model, target_rank=6)
        with torch.no_grad():
            torch.testing.assert_close(model(x), fresh(dirs[2])(x))
        tilpass.hotswap_adapter(model, dirs[6], adapter_name="default")
        target = dirs[6]
    else:
        model = fresh(dirs[6])
        tilpass.hotswap_adapter(model, dirs[2], adapter_name="default")
        target = dirs[2]
    with torch.no_grad():
        torch.testing.assert_close(model(x), fresh(target)(x))
    with pytest.raises(
        ValueError, match="target rank 7, but the target rank is not divisible by 2"
    ):
        tilpass.prepare_model_for_compiled_hotswap(model, target_rank=7)
