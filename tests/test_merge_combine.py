"""Weighted combinations of LoRA adapters: TIES, DARE and magnitude pruning against PEFT's own
output (the same tensors, the same torch seed for DARE's masks), and the rules' properties
checked on plain tensors against float64 formulas."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import tiny_llama, tokens
from torch import nn

import tilpass
from tilpass.merging import add_weighted
from tilpass.methods.lora.task_arithmetic import combine

os.environ.setdefault("HF_HUB_OFFLINE", "1")
peft = pytest.importorskip("peft")

pytestmark = [pytest.mark.filterwarnings("ignore:adapter '.*' is .* MiB:UserWarning")]

FIRST = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
SECOND = dict(r=4, lora_alpha=4, target_modules=["q_proj", "o_proj"], init_lora_weights=False)


def _pair() -> tuple[tilpass.AdaptedModel, nn.Module]:
    """Two random adapters "one", "two" in tilpass and the same tensors in PEFT."""
    torch.manual_seed(3)
    ours = tilpass.get_peft_model(tiny_llama(), tilpass.LoraConfig(**FIRST), adapter_name="one")
    ours.add_adapter("two", tilpass.LoraConfig(**SECOND))
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**FIRST), adapter_name="one")
    theirs.add_adapter("two", peft.LoraConfig(**SECOND))
    for name in ("one", "two"):
        state = tilpass.get_peft_model_state_dict(ours, adapter_name=name)
        assert not peft.set_peft_model_state_dict(theirs, state, adapter_name=name).unexpected_keys
    return ours, theirs


def _mix_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().clone()
        for k, v in tilpass.get_peft_model_state_dict(model, adapter_name="mix").items()
    }


@pytest.mark.parametrize(
    ("combination", "sign_method"),
    [
        ("ties", "total"),
        ("ties", "frequency"),
        ("ties_svd", "total"),
        ("dare_ties", "total"),
        ("dare_linear_svd", "total"),
        ("magnitude_prune", "total"),
    ],
)
def test_combination_matches_peft(combination: str, sign_method: str) -> None:
    ours, theirs = _pair()
    kwargs = {"density": 0.5, "majority_sign_method": sign_method}
    torch.manual_seed(11)  # DARE's masks: the same draws in the same order as PEFT's
    theirs.add_weighted_adapter(["one", "two"], [0.7, -1.3], "mix", combination, **kwargs)
    torch.manual_seed(11)
    add_weighted(ours, ["one", "two"], [0.7, -1.3], "mix", combination, {}, **kwargs)
    mine = _mix_tensors(ours)
    expected = peft.get_peft_model_state_dict(theirs, adapter_name="mix")
    assert sorted(mine) == sorted(expected)
    for key, value in expected.items():
        torch.testing.assert_close(mine[key], value, atol=1e-6, rtol=1e-6, msg=key)
    assert ours.peft_config["mix"].r == theirs.peft_config["mix"].r
    ours.set_adapter("mix")
    theirs.set_adapter("mix")
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(
            ours(input_ids=x).logits, theirs(input_ids=x).logits, atol=1e-5, rtol=1e-5
        )


def test_pruning_combinations_need_a_density() -> None:
    ours, _ = _pair()
    with pytest.raises(ValueError, match="needs density"):
        add_weighted(ours, ["one", "two"], [1.0, 1.0], "mix", "ties", {})
    with pytest.raises(ValueError, match="majority_sign_method"):
        add_weighted(ours, ["one", "two"], [1.0, 1.0], "mix", "ties", {}, 0.5, "mode")
    assert "mix" not in ours.peft_config


# -- the rules on plain tensors --------------------------------------------------------------
def test_ties_trims_elects_and_averages_the_agreeing_entries() -> None:
    t1 = torch.tensor([[3.0, -1.0], [0.5, 2.0]])
    t2 = torch.tensor([[-1.0, -4.0], [0.25, -3.0]])
    weights = torch.tensor([2.0, 1.0])
    got = combine("ties", [t1, t2], weights, density=0.5)
    # trimmed: t1 -> [[3, 0], [0, 2]], t2 -> [[0, -4], [0, -3]]; sums [[3, -4], [0, -1]]
    # elected signs [[+, -], [+, -]]; agreeing weighted entries averaged
    expected = torch.tensor([[6.0, -4.0], [0.0, -3.0]])
    torch.testing.assert_close(got, expected)
    # frequency: entry (1, 1) has one + (t1) and one - (t2): a tie counts as +
    got = combine("ties", [t1, t2], weights, density=0.5, sign_method="frequency")
    torch.testing.assert_close(got, torch.tensor([[6.0, -4.0], [0.0, 4.0]]))


def test_dare_keeps_a_density_fraction_rescaled_and_is_unbiased() -> None:
    torch.manual_seed(0)
    t = torch.randn(200, 200, dtype=torch.float64)
    out = combine("dare_linear", [t], torch.tensor([1.0], dtype=torch.float64), density=0.25)
    kept = out != 0
    assert abs(kept.double().mean().item() - 0.25) < 0.01
    torch.testing.assert_close(out[kept], t[kept] / 0.25)
    draws = torch.stack(
        [combine("dare_linear", [t], torch.ones(1, dtype=torch.float64), 0.5) for _ in range(200)]
    )
    assert (draws.mean(dim=0) - t).abs().max().item() < 5 * 2 * t.abs().max().item() / 200**0.5
    torch.manual_seed(5)
    first = combine("dare_ties", [t, -t], torch.ones(2, dtype=torch.float64), 0.5)
    torch.manual_seed(5)
    again = combine("dare_ties", [t, -t], torch.ones(2, dtype=torch.float64), 0.5)
    torch.testing.assert_close(first, again, atol=0, rtol=0)


def test_magnitude_prune_keeps_the_largest_entries() -> None:
    t = torch.tensor([1.0, -5.0, 2.0, 0.5])
    got = combine("magnitude_prune", [t], torch.tensor([3.0]), density=0.5)
    torch.testing.assert_close(got, torch.tensor([0.0, -15.0, 6.0, 0.0]))
