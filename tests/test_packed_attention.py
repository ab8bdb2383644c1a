"""Per-example attention for packed rows: against a float64 reference, each example run alone,
and PEFT's loss and gradients on the padded batch; the switch is scoped to a training run."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.reference.packed_attention_ref import block_causal_attention
from tests.test_packing import PACKED, events, nonzero_b, per_token_losses
from tests.test_train import cfg, collate, make_items, tiny_lora
from tilpass.data.packing import collate_packed, prepare_packing
from tilpass.losses import causal_lm_loss
from tilpass.packed_attention import (
    NAME,
    PackedAttention,
    example_spans,
    packed_sdpa_forward,
    supports_packed_attention,
)
from tilpass.train import train


class _Heads(nn.Module):
    """What transformers' sdpa function reads from an attention module."""

    num_key_value_groups = 2
    is_causal = True


def test_example_spans_cut_where_positions_do_not_continue() -> None:
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1], [0, 1, 2, 3, 4, 5, 6, 7]])
    assert example_spans(pos, 2) == [[(0, 3), (3, 5), (5, 6), (6, 8)], [(0, 8)]]
    assert example_spans(torch.arange(6)[None], 3) is None  # nothing packed: plain causal
    assert example_spans(pos[:1], 2) == [[(0, 3), (3, 5), (5, 6), (6, 8)]] * 2  # broadcast


def test_packed_attention_equals_a_float64_block_diagonal_reference() -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 11, 8, generator=g)  # (B, H, T, D)
    k, v = torch.randn(2, 2, 11, 8, generator=g), torch.randn(2, 2, 11, 8, generator=g)
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2]])
    spans = example_spans(pos, 2)
    assert spans is not None
    want = block_causal_attention(q, k, v, spans)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        q_, k_, v_ = q.to(dtype), k.to(dtype), v.to(dtype)
        out, _ = packed_sdpa_forward(_Heads(), q_, k_, v_, None, scaling=8**-0.5, position_ids=pos)
        assert out.dtype == dtype
        torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)
    # With a padding mask the call is transformers' own sdpa function, unchanged.
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    mask = torch.ones(2, 1, 11, 11, dtype=torch.bool).tril()
    mask[1, :, :, :3] = False
    want, _ = sdpa_attention_forward(_Heads(), q, k, v, mask, scaling=0.3)
    got, _ = packed_sdpa_forward(_Heads(), q, k, v, mask, scaling=0.3, position_ids=pos)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def lora_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Gradients keyed by layer, projection and factor (``0.q_proj.A``), whatever the prefix."""
    out = {}
    for name, p in model.named_parameters():
        found = re.search(r"layers\.(\d+)\.self_attn\.(\w_proj)\.lora_([AB])", name)
        if p.grad is not None and found:
            out[".".join(found.groups())] = p.grad.clone()
    return out


def peft_twin(model: nn.Module, tmp_path: Path) -> nn.Module:
    """The same base and adapter weights as a PEFT model (through the adapter files)."""
    from peft import PeftModel

    from tests.test_train import tiny_llama

    model.save_pretrained(str(tmp_path / "adapter"))
    return PeftModel.from_pretrained(tiny_llama(0), str(tmp_path / "adapter"), is_trainable=True)


def test_a_flat_packed_row_matches_each_example_alone_and_peft_padded(tmp_path: Path) -> None:
    model = nonzero_b(tiny_lora())
    attention = PackedAttention.for_model(model)
    assert attention.enabled
    items = make_items(6, seed=3)
    flat = collate_packed([items], pad_token_id=0)  # one padding-free row
    assert flat["input_ids"].shape == (1, sum(len(x["input_ids"]) for x in items))
    model.eval()
    with attention.active(), torch.no_grad():
        assert model.get_base_model().config._attn_implementation == NAME
        got = per_token_losses(model, flat)[0]
    assert model.get_base_model().config._attn_implementation == "sdpa"  # switched back
    at = 0
    with torch.no_grad():
        for item in items:
            n = len(item["input_ids"])
            want = per_token_losses(model, {k: v[:, :n] for k, v in collate([item]).items()})[0]
            torch.testing.assert_close(got[at : at + n - 1], want, rtol=1e-5, atol=1e-6)
            at += n
    # Loss and LoRA gradients of the packed row equal PEFT's on the padded batch.
    model.train()
    with attention.active():
        loss, n_tok = causal_lm_loss(model, flat)
        (loss / n_tok).backward()
    ours = lora_grads(model)
    twin = peft_twin(model, tmp_path)
    twin.train()
    padded = collate(items)
    out = twin(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"])
    target = padded["labels"][:, 1:]
    theirs = F.cross_entropy(out.logits[:, :-1].transpose(1, 2), target, ignore_index=-100)
    theirs.backward()
    torch.testing.assert_close(loss / n_tok, theirs, rtol=1e-5, atol=1e-6)
    peft_grads = lora_grads(twin)
    assert sorted(ours) == sorted(peft_grads) and len(ours) == 8  # A, B of q, v; two layers
    for key, grad in ours.items():
        assert grad.abs().max() > 0
        torch.testing.assert_close(grad, peft_grads[key], rtol=1e-4, atol=1e-6)


def _drop_position_ids(model: nn.Module) -> nn.Module:
    """Attention modules that never see the position ids (the model's mask still does)."""
    for layer in model.get_base_model().model.layers:
        inner = layer.self_attn.forward

        def forward(*args: Any, _inner: Any = inner, **kwargs: Any) -> Any:
            kwargs.pop("position_ids", None)
            return _inner(*args, **kwargs)

        layer.self_attn.forward = forward
    return model


def test_a_model_whose_attention_misses_the_boundaries_falls_back_to_masked_rows(
    tmp_path: Path,
) -> None:
    items = make_items(6)
    assert prepare_packing(nonzero_b(tiny_lora()), items).enabled
    model = _drop_position_ids(nonzero_b(tiny_lora()))
    attention = prepare_packing(model, items)  # the per-example check fails: masked rows
    assert not attention.enabled
    assert model.get_base_model().config._attn_implementation == "sdpa"
    train(model, items, None, collate, cfg(max_steps=2, batch_size=6), tmp_path, batching=PACKED)
    steps = [e for e in events(tmp_path) if e["event"] == "train"]
    assert steps[0]["padding_fraction"] > 0  # rows of max_length, not one flat row


@pytest.mark.parametrize(
    ("change", "expected"),
    [({}, True), ({"_attn_implementation": "eager"}, False), ({"sliding_window": 4}, False)],
)
def test_only_full_causal_sdpa_models_qualify(change: dict[str, Any], expected: bool) -> None:
    model = tiny_lora()
    for key, value in change.items():
        setattr(model.get_base_model().config, key, value)
    assert supports_packed_attention(model) is expected
    assert not supports_packed_attention(nn.Linear(2, 2))
