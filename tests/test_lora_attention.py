"""LoRA on nn.MultiheadAttention inside PyTorch's own transformer layers: the wrapped attention
answers for the module's settings (PyTorch reads them before every call), and PEFT's errors
for what it cannot adapt."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tilpass
from tests.parity import outputs, perturb

TOL64 = {"atol": 1e-10, "rtol": 1e-10}
SETTINGS = (
    "embed_dim",
    "kdim",
    "vdim",
    "_qkv_same_embed_dim",
    "num_heads",
    "head_dim",
    "dropout",
    "batch_first",
    "add_zero_attn",
)


class Encoder(nn.Module):
    """One PyTorch transformer encoder layer (sequence first, as its default)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0)
        self.layer.to(torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


@pytest.mark.parametrize("add_bias_kv", [False, True])
def test_wrapped_attention_answers_for_the_module(add_bias_kv: bool) -> None:
    mha = nn.MultiheadAttention(8, 2, dropout=0.1, batch_first=True, add_bias_kv=add_bias_kv)
    holder = nn.ModuleDict({"mha": mha})
    expected = {name: getattr(mha, name) for name in SETTINGS}
    model = tilpass.get_peft_model(holder, tilpass.LoraConfig(target_modules=["mha"]))
    layer = model.base_model["mha"]
    assert isinstance(layer, tilpass.methods.lora.LoraAttention)
    assert {name: getattr(layer, name) for name in SETTINGS} == expected
    assert layer.in_proj_weight is mha.in_proj_weight and layer.out_proj is mha.out_proj
    assert layer.in_proj_bias is mha.in_proj_bias
    assert (layer.bias_k is None) == (not add_bias_kv) and layer.bias_k is mha.bias_k
    attn_mask = torch.randint(0, 2, (5, 5)).bool()
    padding = torch.randint(0, 2, (3, 5)).bool()
    query = torch.rand(3, 5, 8)
    got = layer.merge_masks(attn_mask, padding, query)
    want = mha.merge_masks(attn_mask, padding, query)
    assert torch.equal(got[0], want[0]) and got[1] == want[1]


def test_lora_on_a_transformer_encoder_layer_s_attention_matches_float64() -> None:
    model = tilpass.get_peft_model(
        Encoder(), tilpass.LoraConfig(target_modules=["self_attn"], r=4, lora_alpha=8)
    ).eval()
    perturb(model.adapter_parameters("default"), seed=1)
    t = model.adapter_state_dict("default")
    p = "base_model.model.layer.self_attn."
    reference = Encoder().eval()
    with torch.no_grad():
        attention = reference.layer.self_attn
        attention.in_proj_weight += 2.0 * t[f"{p}lora_B.weight"] @ t[f"{p}lora_A.weight"]
        out_a, out_b = (
            t[f"{p}base_layer.out_proj.lora_A.weight"],
            t[f"{p}base_layer.out_proj.lora_B.weight"],
        )
        attention.out_proj.weight += 2.0 * out_b @ out_a
    x = torch.randn(5, 3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    expected = outputs(reference, x)
    assert not torch.allclose(expected, outputs(Encoder().eval(), x))
    torch.testing.assert_close(outputs(model, x), expected, **TOL64)


def test_attention_refusals_use_peft_s_words() -> None:
    holder = nn.ModuleDict({"mha": nn.MultiheadAttention(8, 2, kdim=4, vdim=6)})
    with pytest.raises(ValueError, match="Only same embed for query/key/value is supported"):
        tilpass.get_peft_model(holder, tilpass.LoraConfig(target_modules=["mha"]))
    holder = nn.ModuleDict({"mha": nn.MultiheadAttention(8, 2)})
    config = tilpass.LoraConfig(target_modules=["mha"], use_dora=True)
    with pytest.raises(ValueError, match=r"MultiheadAttention does not support DoRA \(yet\)"):
        tilpass.get_peft_model(holder, config)
    assert isinstance(holder["mha"], nn.MultiheadAttention)  # nothing left wrapped
