"""Prompt tuning beyond the per-method matrix: extended inputs, the KV cache, mixed batches
with other methods' adapters, initialisation and errors (`tilpass train` with it is tested
beside the hybrid's, in test_lora_prompt.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import tilpass
from tests.helpers import lora, tiny_gpt2, tiny_llama, tokens

ATOL = 1e-5


def prompt(n: int = 3, **kw: Any) -> tilpass.PromptTuningConfig:
    return tilpass.PromptTuningConfig(num_virtual_tokens=n, **kw)


def with_prompt(n: int = 3, seed: int = 0) -> tilpass.AdaptedModel:
    torch.manual_seed(seed + 100)
    return tilpass.get_peft_model(tiny_llama(), prompt(n))


def real_logits(model: Any, x: torch.Tensor, **kw: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x, **kw).logits[:, -x.shape[1] :]


def test_labels_mask_and_positions_are_extended() -> None:
    model = with_prompt(3)
    x = tokens(batch=2, length=5)
    mask = torch.ones_like(x)
    mask[0, :2] = 0  # left padding in the caller's own mask stays masked
    labels = x.clone()
    labels[1, :3] = -100
    seen: dict[str, torch.Tensor] = {}

    def spy(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        seen.update({k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)})

    handle = model.base_model.register_forward_pre_hook(spy, with_kwargs=True)
    with torch.no_grad():
        out = model(input_ids=x, attention_mask=mask, labels=labels)
    handle.remove()
    assert seen["inputs_embeds"].shape == (2, 8, 32) and "input_ids" not in seen
    assert seen["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 1, 1, 1], [1] * 8]
    assert seen["labels"][:, :3].eq(-100).all() and torch.equal(seen["labels"][:, 3:], labels)
    # the virtual tokens carry no loss; the last of them predicts the first real token
    logits = out.logits[:, 2:-1]  # (B, T, V)
    expected = F.cross_entropy(logits.reshape(-1, 128), labels.reshape(-1))
    torch.testing.assert_close(out.loss, expected)


def test_generate_with_the_kv_cache_equals_greedy_recomputation() -> None:
    model = with_prompt(4)
    x = tokens(batch=2, length=5)
    out = model.generate(input_ids=x, max_new_tokens=5, do_sample=False, pad_token_id=0)
    seq = x
    for _ in range(5):  # no cache: the whole sequence, virtual tokens included, every step
        nxt = real_logits(model, seq)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq)
    detailed = model.generate(
        input_ids=x,
        max_new_tokens=5,
        do_sample=False,
        pad_token_id=0,
        return_dict_in_generate=True,
        output_scores=True,
    )
    assert torch.equal(detailed.sequences, out) and len(detailed.scores) == 5
    with model.disable_adapter():
        base = model.generate(input_ids=x, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert not torch.equal(out, base)


def test_forward_with_a_cache_continues_after_the_virtual_tokens() -> None:
    model = with_prompt(3)
    x = tokens(batch=2, length=6)
    with torch.no_grad():
        first = model(input_ids=x[:, :5], attention_mask=torch.ones(2, 5), use_cache=True)
        step = model(
            input_ids=x[:, 5:],
            attention_mask=torch.ones(2, 6),
            cache=first.past_key_values,
        )
    torch.testing.assert_close(step.logits[:, -1], real_logits(model, x)[:, -1], atol=ATOL, rtol=0)


def mixed_model() -> tilpass.AdaptedModel:
    """A LoRA adapter and two prompt adapters of different lengths on one base model."""
    torch.manual_seed(5)
    model = tilpass.get_peft_model(tiny_llama(), lora(), adapter_name="lora")
    model.add_adapter("short", prompt(2))
    model.add_adapter("long", prompt(5))
    return model


def single_run(model: tilpass.AdaptedModel, name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "__base__":
        with model.disable_adapter():
            return real_logits(model, x)
    model.set_adapter(name)
    return real_logits(model, x)


def test_a_batch_mixes_prompt_rows_with_lora_and_base_rows() -> None:
    model = mixed_model()
    x = tokens(batch=5, length=6)
    names = ["long", "lora", "__base__", "short", "long"]
    mixed = real_logits(model, x, adapter_names=names)
    for i, name in enumerate(names):
        torch.testing.assert_close(mixed[i], single_run(model, name, x)[i], atol=ATOL, rtol=ATOL)
    assert not torch.allclose(mixed[0], mixed[3], atol=1e-3)


def test_mixed_generate_rows_equal_single_adapter_generate() -> None:
    model = mixed_model()
    x = tokens(batch=3, length=5)
    names = ["short", "lora", "__base__"]
    kw: dict[str, Any] = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    mixed = model.generate(input_ids=x, adapter_names=names, **kw)
    for i, name in enumerate(names):
        alone = model.generate(input_ids=x[i : i + 1], adapter_names=[name], **kw)
        assert torch.equal(mixed[i], alone[0]), name


def test_init_from_text_and_from_the_vocabulary(tiny_tokenizer: Any, tmp_path: Path) -> None:
    tiny_tokenizer.save_pretrained(tmp_path)
    base = tiny_llama(vocab_size=len(tiny_tokenizer))
    embeddings = base.get_input_embeddings().weight.detach().clone()
    config = prompt(
        7,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text="chest pain",
        tokenizer_name_or_path=str(tmp_path),
    )
    model = tilpass.get_peft_model(base, config)
    ids = tiny_tokenizer("chest pain")["input_ids"]
    expected = embeddings[(ids * 7)[:7]]
    got = model.adapter_state_dict("default")["prompt_embeddings"]
    assert torch.equal(got, expected)
    model.add_adapter("sampled", prompt(4, prompt_tuning_init="SAMPLE_VOCAB"))
    sampled = model.adapter_state_dict("sampled")["prompt_embeddings"]
    assert all(bool((row == embeddings).all(dim=1).any()) for row in sampled)


def test_bad_input_gets_clear_errors() -> None:
    with pytest.raises(ValueError, match="SAMPLE_VOCAB"):
        prompt(prompt_tuning_init="WORDS")
    with pytest.raises(ValueError, match="tokenizer_name_or_path"):
        prompt(prompt_tuning_init="TEXT")
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        prompt(0)
    model = mixed_model()
    x = tokens(batch=2, length=4)
    per_token = torch.full((2, 4), model.adapter_id("short"))
    with pytest.raises(ValueError, match="one adapter id per row"):
        model(input_ids=x, adapter_ids=per_token)
    lora_only = torch.full((2, 4), model.adapter_id("lora"))  # packed rows without prompts
    model.set_adapter("lora")
    torch.testing.assert_close(real_logits(model, x, adapter_ids=lora_only), real_logits(model, x))
    model.set_adapter(["short", "long"])
    with pytest.raises(ValueError, match="activate one"):
        model(input_ids=x)
    model.set_adapter("short")
    with pytest.raises(NotImplementedError, match="merge_adapter"):
        model.merge_and_unload()


def test_gpt2_absolute_positions_in_mixed_batches_and_peft(tmp_path: Path) -> None:
    """GPT-2 adds learned absolute position embeddings, so a row padded in front of a shorter
    prompt must still number its own tokens from 0."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(1)
    model = tilpass.get_peft_model(tiny_gpt2(), prompt(2), adapter_name="short")
    model.add_adapter("long", prompt(4))
    x = tokens(batch=3, length=5)
    names = ["short", "long", "__base__"]
    mixed = real_logits(model, x, adapter_names=names)
    for i, name in enumerate(names):
        torch.testing.assert_close(mixed[i], single_run(model, name, x)[i], atol=ATOL, rtol=ATOL)
    model.save_pretrained(tmp_path, selected_adapters=["short"])
    theirs = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "short").eval()
    model.set_adapter("short")
    with torch.no_grad():
        expected = theirs(input_ids=x).logits
    torch.testing.assert_close(model(input_ids=x).logits, expected, atol=ATOL, rtol=ATOL)
