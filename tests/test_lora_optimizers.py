"""LoRA+ parameter groups and the LoRA-FA optimizer, against PEFT's functions and a float64
formula, on a tiny model with non-zero adapters."""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import tilpass
from tilpass.methods.lora.optimizers import projected_gradient

os.environ.setdefault("HF_HUB_OFFLINE", "1")
peft = pytest.importorskip("peft")
import peft.optimizers.lorafa as peft_lorafa  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:LoRA rank:UserWarning")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(20, 8)
        self.norm = nn.LayerNorm(8)
        self.lin0 = nn.Linear(8, 8)
        self.lin1 = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(self.norm(self.embedding(x)))))


IDS = torch.tensor([[1, 4, 7], [2, 2, 9]])


def net() -> Net:
    torch.manual_seed(0)
    return Net()


def test_loraplus_groups_by_layer_kind() -> None:
    config = tilpass.LoraConfig(
        target_modules=["embedding", "lin0"], modules_to_save=["lin1"], lora_bias=False
    )
    model = tilpass.get_peft_model(net(), config)
    optimizer = tilpass.create_loraplus_optimizer(
        model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=4.0, loraplus_lr_embedding=1e-5
    )
    base = model.get_base_model()
    ids = [{id(p) for p in group["params"]} for group in optimizer.param_groups]
    lr = [group["lr"] for group in optimizer.param_groups]
    assert lr == [1e-3, 1e-5, 4e-3, 4e-3]
    copy = base.lin1.modules_to_save["default"]
    assert ids[0] == {id(base.lin0.lora_A["default"]), id(copy.weight)}
    assert ids[1] == {
        id(base.embedding.lora_embedding_A["default"]),
        id(base.embedding.lora_embedding_B["default"]),
    }
    assert ids[2] == {id(base.lin0.lora_B["default"])}
    assert ids[3] == {id(copy.bias)}  # a 1-d bias: B's learning rate, no weight decay
    assert optimizer.param_groups[3]["weight_decay"] == 0.0


def _pair(tmp_path: Path) -> tuple[nn.Module, nn.Module]:
    """The same non-zero adapter in PEFT and in tilpass (tilpass loads PEFT's file)."""
    config = {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["lin0", "lin1"],
        "rank_pattern": {"lin1": 2},
    }
    torch.manual_seed(3)
    theirs = peft.get_peft_model(net(), peft.LoraConfig(init_lora_weights=False, **config))
    theirs.save_pretrained(tmp_path)
    ours = tilpass.PeftModel.from_pretrained(net(), tmp_path, is_trainable=True)
    return theirs, ours


def _step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    model(IDS).square().mean().backward()
    optimizer.step()


def test_lorafa_step_matches_peft(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(peft_lorafa, "is_bf16_available", lambda: False)  # PEFT in float32
    theirs, ours = _pair(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        their_opt = peft.optimizers.create_lorafa_optimizer(
            theirs, r=4, lora_alpha=8, lr=1e-2, weight_decay=0.1
        )
    our_opt = tilpass.create_lorafa_optimizer(ours, r=4, lora_alpha=8, lr=1e-2, weight_decay=0.1)
    for _ in range(2):
        _step(theirs, their_opt)
        _step(ours, our_opt)
        their_opt.zero_grad()
        our_opt.zero_grad()
    mine = ours.get_base_model()
    for layer in ("lin0", "lin1"):
        peft_layer = theirs.base_model.model.get_submodule(layer)
        for factor in ("lora_A", "lora_B"):
            expected = getattr(peft_layer, factor)["default"].weight
            torch.testing.assert_close(
                getattr(mine.get_submodule(layer), factor)["default"], expected
            )
        assert not mine.get_submodule(layer).lora_A["default"].requires_grad
    scales = [s for s in our_opt.param_groups[0]["scaling_factors"] if s is not None]
    assert sorted(set(scales)) == [2.0, 4.0]  # each layer's own alpha / r (rank_pattern)


def test_projected_gradient_float64() -> None:
    torch.manual_seed(0)
    a, g = torch.randn(3, 7), torch.randn(5, 3)
    a64, g64 = a.double(), g.double()
    expected = (
        g64 @ torch.linalg.inv(a64 @ a64.T + 1e-8 * torch.eye(3, dtype=torch.float64)) / 2.0**2
    )
    torch.testing.assert_close(
        projected_gradient(g, a, 2.0).double(), expected, rtol=1e-4, atol=1e-5
    )


def test_lorafa_rslora_argument_must_agree() -> None:
    model = tilpass.get_peft_model(
        net(), tilpass.LoraConfig(target_modules=["lin0"], use_rslora=True)
    )
    with pytest.raises(ValueError, match="was passed to create_lorafa_optimizer"):
        tilpass.create_lorafa_optimizer(model, r=8, lora_alpha=8, lr=1e-3, use_rslora=False)
    with pytest.warns(FutureWarning, match="deprecated"):
        optimizer = tilpass.create_lorafa_optimizer(
            model, r=8, lora_alpha=8, lr=1e-3, use_rslora=True
        )
    assert math.isclose(optimizer.param_groups[0]["scaling_factor"], 8 / math.sqrt(8))


def test_lorafa_optimizer_refuses_groups_without_their_a_factors() -> None:
    with pytest.raises(ValueError, match="lora_A_index"):
        tilpass.LoraFAOptimizer([{"params": [nn.Parameter(torch.ones(2))], "names": ["w"]}])
