"""LoRA on nn.MultiheadAttention and on bare parameters (target_parameters, mixture-of-experts
weights), and trainable_token_indices: float64 references, merging, and PEFT parity."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import tilpass
from tests.helpers import tiny_llama, tokens
from tests.parity import outputs, peft_both_ways, perturb

TOL64 = {"atol": 1e-10, "rtol": 1e-10}


class Attention(nn.Module):
    """A MultiheadAttention block and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.mha(x, x, x)
        return self.head(h)


class Experts(nn.Module):
    """Mixture-of-experts weights used directly: (E, in, out) stacks run with a batched matmul."""

    def __init__(self, experts: int = 3, dim: int = 6, hidden: int = 5) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(experts, dim, 2 * hidden) * 0.3)
        self.down_proj = nn.Parameter(torch.randn(experts, hidden, dim) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (E, tokens, dim)
        gate, up = torch.bmm(x, self.gate_up_proj).chunk(2, dim=-1)
        return torch.bmm(torch.relu(gate) * up, self.down_proj)


class MoE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.experts = Experts()
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.experts(x))


def seeded(cls: type[nn.Module], dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return cls().to(dtype).eval()


def attention_input(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(4, 5, 8, generator=torch.Generator().manual_seed(3)).to(dtype)


def moe_input(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(3)).to(dtype)


def test_attention_matches_the_float64_reference_and_merges() -> None:
    model = tilpass.get_peft_model(
        seeded(Attention, torch.float64),
        tilpass.LoraConfig(target_modules=["mha"], r=4, lora_alpha=8),
    ).eval()
    perturb(model.adapter_parameters("default"), seed=1)
    t = model.adapter_state_dict("default")
    p = "base_model.model.mha."
    assert set(t) == {
        f"{p}{k}"
        for k in (
            "lora_A.weight",
            "lora_B.weight",
            "base_layer.out_proj.lora_A.weight",
            "base_layer.out_proj.lora_B.weight",
        )
    }
    reference = seeded(Attention, torch.float64)
    with torch.no_grad():
        reference.mha.in_proj_weight += 2.0 * t[f"{p}lora_B.weight"] @ t[f"{p}lora_A.weight"]
        reference.mha.out_proj.weight += (
            2.0
            * t[f"{p}base_layer.out_proj.lora_B.weight"]
            @ t[f"{p}base_layer.out_proj.lora_A.weight"]
        )
    x = attention_input(torch.float64)
    expected = outputs(reference, x)
    assert not torch.allclose(expected, outputs(seeded(Attention, torch.float64), x))
    torch.testing.assert_close(outputs(model, x), expected, **TOL64)
    with model.disable_adapter():
        assert torch.equal(outputs(model, x), outputs(seeded(Attention, torch.float64), x))
    model.merge_adapter()
    torch.testing.assert_close(outputs(model, x), expected, **TOL64)
    model.unmerge_adapter()
    base = seeded(Attention, torch.float64).mha
    torch.testing.assert_close(model.base_model.mha.in_proj_weight, base.in_proj_weight, **TOL64)
    plain = model.merge_and_unload()
    torch.testing.assert_close(outputs(plain, x), expected, **TOL64)


def test_expert_parameters_match_the_float64_reference() -> None:
    config = tilpass.LoraConfig(
        target_modules=[],
        target_parameters=["experts.gate_up_proj", "experts.down_proj"],
        r=2,
        lora_alpha=4,
    )
    model = tilpass.get_peft_model(seeded(MoE, torch.float64), config).eval()
    perturb(model.adapter_parameters("default"), seed=2)
    t = model.adapter_state_dict("default")
    p = "base_model.model.experts."
    # PEFT nests one wrapper per parameter: the first registered one sits deepest.
    a1, b1 = t[f"{p}base_layer.lora_A.weight"], t[f"{p}base_layer.lora_B.weight"]
    a2, b2 = t[f"{p}lora_A.weight"], t[f"{p}lora_B.weight"]
    assert a1.shape == (3 * 2, 10) and b1.shape == (6, 3 * 2)  # gate_up_proj (3, 6, 10)
    reference = seeded(MoE, torch.float64)
    with torch.no_grad():
        for param, a, b in (
            (reference.experts.gate_up_proj, a1, b1),
            (reference.experts.down_proj, a2, b2),
        ):
            for e in range(3):  # A rows e r + k, B columns k E + e
                a_e = a[e * 2 : (e + 1) * 2]  # (r, in)
                b_e = b[:, e::3]  # (out, r)
                param[e] += 2.0 * (b_e @ a_e)  # (d1, d2)
    x = moe_input(torch.float64)
    torch.testing.assert_close(outputs(model, x), outputs(reference, x), **TOL64)
    model.merge_adapter()
    torch.testing.assert_close(outputs(model, x), outputs(reference, x), **TOL64)


def doubled_out_proj(model: tilpass.AdaptedModel) -> tilpass.AdaptedModel:
    """PEFT 0.21.2 applies a MultiheadAttention's out_proj update twice (its forward merges
    the out_proj delta into the weight and then merges the wrapped out_proj layer as well);
    tilpass applies s B A once, as the method defines. Doubling B reproduces PEFT's outputs."""
    key = "base_model.model.mha.base_layer.out_proj.lora_B.weight"
    with torch.no_grad():
        model.adapter_state_dict("default")[key].mul_(2)
    return model


def test_attention_peft_files_both_ways(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    settings = {"r": 4, "lora_alpha": 8, "target_modules": ["mha"], "init_lora_weights": False}
    x = attention_input()
    theirs = peft.get_peft_model(seeded(Attention), peft.LoraConfig(**settings)).eval()
    perturb([p for p in theirs.parameters() if p.requires_grad], seed=11)
    theirs.save_pretrained(tmp_path / "peft")
    ours = tilpass.AdaptedModel.from_pretrained(seeded(Attention), tmp_path / "peft").eval()
    assert not torch.allclose(outputs(ours, x), outputs(seeded(Attention), x))
    torch.testing.assert_close(outputs(doubled_out_proj(ours), x), outputs(theirs, x))
    model = tilpass.get_peft_model(seeded(Attention), tilpass.LoraConfig(**settings)).eval()
    perturb(model.adapter_parameters("default"), seed=12)
    model.save_pretrained(tmp_path / "ours")
    loaded = peft.PeftModel.from_pretrained(seeded(Attention), tmp_path / "ours").eval()
    assert set(model.adapter_state_dict("default")) == set(
        peft.utils.get_peft_model_state_dict(loaded)
    )
    torch.testing.assert_close(outputs(loaded, x), outputs(doubled_out_proj(model), x))


def test_target_parameters_peft_parity_both_ways(tmp_path: Path) -> None:
    pytest.importorskip("peft")
    settings = {
        "r": 2,
        "lora_alpha": 4,
        "target_modules": [],
        "target_parameters": ["experts.gate_up_proj", "experts.down_proj"],
        "init_lora_weights": False,
    }
    peft_both_ways(lambda: seeded(MoE), settings, moe_input(), tmp_path)


def test_trainable_tokens_replace_only_their_rows_and_merge() -> None:
    config = tilpass.LoraConfig(
        target_modules=["q_proj"], trainable_token_indices=[3, 5, 7], init_lora_weights=False
    )
    model = tilpass.get_peft_model(tiny_llama(), config).eval()
    perturb(model.adapter_parameters("default"), seed=4)
    delta = model.adapter_state_dict("default")[
        "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"
    ]
    emb = model.base_model.model.embed_tokens
    ids = torch.tensor([[3, 4, 5, 7, 9]])
    expected = tiny_llama().model.embed_tokens.weight[ids].detach().clone()
    expected[0, [0, 2, 3]] = delta.detach()
    assert torch.equal(emb(ids), expected)
    x = tokens()
    unmerged = outputs(model, x)
    model.merge_adapter()
    torch.testing.assert_close(outputs(model, x), unmerged, atol=1e-6, rtol=1e-6)
    model.unmerge_adapter()
    assert torch.equal(emb.weight, tiny_llama().model.embed_tokens.weight)


def test_trainable_tokens_peft_parity_both_ways(tmp_path: Path) -> None:
    pytest.importorskip("peft")
    settings = {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj"],
        "trainable_token_indices": {"embed_tokens": [3, 5, 7]},
        "init_lora_weights": False,
    }
    peft_both_ways(tiny_llama, settings, tokens(), tmp_path)


def test_trainable_tokens_mixed_batch_rows_equal_single_runs() -> None:
    config = tilpass.LoraConfig(
        target_modules=["q_proj"], trainable_token_indices=[3, 5, 7, 9], init_lora_weights=False
    )
    model = tilpass.get_peft_model(tiny_llama(), config).eval()
    model.add_adapter(
        "other",
        tilpass.LoraConfig(
            target_modules=["q_proj"], trainable_token_indices=[5, 11], init_lora_weights=False
        ),
    )
    for name in ("default", "other"):
        perturb(model.adapter_parameters(name), seed=len(name))
    x = torch.tensor([[3, 5, 7, 9, 11, 4]] * 3)
    names = ["default", "other", "__base__"]
    with torch.no_grad():
        mixed = model(input_ids=x, adapter_names=names).logits
        with model.disable_adapter():
            expected = {"__base__": model(input_ids=x).logits}
        for name in names[:2]:
            model.set_adapter(name)
            expected[name] = model(input_ids=x).logits
    for row, name in enumerate(names):
        assert torch.allclose(mixed[row], expected[name][row]), name


def test_mixed_batches_through_parameter_targets_refuse_clearly() -> None:
    model = tilpass.get_peft_model(seeded(Attention), tilpass.LoraConfig(target_modules=["mha"]))
    model.add_adapter("other", tilpass.LoraConfig(target_modules=["mha"]))
    with pytest.raises(NotImplementedError, match="does not support mixed-adapter batches"):
        model(attention_input(), adapter_names=["default", "other", "default", "other"])
