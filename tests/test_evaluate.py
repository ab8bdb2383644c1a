"""Tests for evaluation: token-weighted loss, greedy exact-match generation, both at once."""

from __future__ import annotations

import importlib
import math
from typing import Any

import pytest
import torch
from transformers import LlamaForCausalLM

from tests import helpers
from tilpass.evaluate import (
    evaluate_generation,
    evaluate_loss,
    evaluate_model,
    normalize_answer,
)

VOCAB = 40
PAD, EOS = 0, 2


def tiny_llama(dtype: torch.dtype = torch.float64) -> LlamaForCausalLM:
    return helpers.tiny_llama(0, dtype, vocab_size=VOCAB)


class CharTokenizer:
    """Ids 3.. map to letters; 0 is pad, 2 is eos (skipped as special)."""

    pad_token_id = PAD
    eos_token_id = EOS

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        chars = []
        for i in ids:
            if i in (PAD, 1, EOS):
                if not skip_special_tokens:
                    chars.append(f"<{i}>")
            else:
                chars.append(chr(ord("a") + (i - 3) % 26))
        return "".join(chars)


def collate(items: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    width = max(len(x["input_ids"]) for x in items)
    out = {
        "input_ids": torch.full((len(items), width), PAD),
        "attention_mask": torch.zeros((len(items), width), dtype=torch.long),
        "labels": torch.full((len(items), width), -100),
    }
    for i, x in enumerate(items):
        n = len(x["input_ids"])
        out["input_ids"][i, :n] = torch.tensor(x["input_ids"])
        out["attention_mask"][i, :n] = 1
        out["labels"][i, :n] = torch.tensor(x["labels"])
    return out


def items(n: int = 7) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(1)
    result = []
    for k in range(n):
        ids = torch.randint(3, VOCAB, (4 + k,), generator=g).tolist()
        result.append({"input_ids": ids, "labels": [-100, -100, *ids[2:]]})
    return result


def test_normalize_answer() -> None:
    assert normalize_answer("  Paris.\n") == "paris"
    assert normalize_answer("The  ANSWER is 4!!") == "the answer is 4"
    assert normalize_answer("Straße") == normalize_answer("STRASSE")
    assert normalize_answer("3.5") == "3.5"
    assert normalize_answer("...") == ""


def test_evaluate_loss_is_token_weighted_mean() -> None:
    model = tiny_llama()
    data = items()
    result = evaluate_loss(model, data, collate, batch_size=3)
    # Reference: one example at a time, transformers' own mean loss weighted by token count.
    total, tokens = 0.0, 0
    with torch.no_grad():
        for x in data:
            b = collate([x])
            n = int((b["labels"][:, 1:] != -100).sum())
            total += float(model(**b).loss) * n
            tokens += n
    assert result["tokens"] == tokens
    assert result["loss"] == pytest.approx(total / tokens, rel=1e-6)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    assert not model.training


def _greedy_alone(model: LlamaForCausalLM, prompt: list[int], max_new: int) -> list[int]:
    out = model.generate(
        input_ids=torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False, pad_token_id=PAD
    )
    new = out[0, len(prompt) :].tolist()
    return new[: new.index(EOS)] if EOS in new else new


def test_batched_left_padded_generation_matches_one_by_one() -> None:
    model = tiny_llama()
    tok = CharTokenizer()
    prompts = [[5, 9, 11], [7, 3, 8, 20, 21, 30, 4], [12], [6, 6, 6, 6, 6]]
    refs = [tok.decode(_greedy_alone(model, p, 6), skip_special_tokens=True) for p in prompts]
    assert all(refs)  # non-empty: the comparison below is not vacuous
    records: list[dict[str, Any]] = [
        {"ids": p, "answer": r.upper() + "."} for p, r in zip(prompts, refs, strict=True)
    ]
    records.append({"ids": [9, 9], "answer": "definitely not this"})
    result = evaluate_generation(
        model,
        tok,
        records,
        prompt_fn=lambda r, _t: r["ids"],
        answer_fn=lambda r: r["answer"],
        max_new_tokens=6,
        batch_size=3,
        num_examples=10,
    )
    assert result["n"] == 5
    assert result["exact_match"] == pytest.approx(4 / 5)
    assert [e["match"] for e in result["examples"]] == [True, True, True, True, False]
    assert [e["prediction"] for e in result["examples"][:4]] == refs


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers deprecations inside peft
@pytest.mark.parametrize("library", ["tilpass", "peft"])
def test_generation_through_adapter_wrapper_and_missing_pad(library: str) -> None:
    lib = importlib.import_module(library)  # a failed import is an error, never a skip
    model = lib.get_peft_model(tiny_llama(), lib.LoraConfig(r=2, target_modules=["q_proj"]))
    tok = CharTokenizer()
    result = evaluate_generation(
        model, tok, [{"ids": [4, 5]}], lambda r, _t: r["ids"], lambda r: "x", max_new_tokens=2
    )
    assert result["n"] == 1 and len(result["examples"]) == 1

    class NoPad(CharTokenizer):
        pad_token_id = None
        eos_token_id = None

    with pytest.raises(ValueError, match="pad_token"):
        evaluate_generation(model, NoPad(), [{"ids": [4]}], lambda r, _t: r["ids"], lambda r: "")


def test_evaluate_model_combines_loss_and_exact_match() -> None:
    model = tiny_llama()
    tok = CharTokenizer()
    data = items()
    records = [{"ids": x["input_ids"][:3], "answer": "zz"} for x in data]
    prompt_fn, answer_fn = (lambda r, _t: r["ids"]), (lambda r: r["answer"])
    both = evaluate_model(
        model,
        data,
        collate,
        tokenizer=tok,
        records=records,
        batch_size=3,
        max_new_tokens=2,
        generation_samples=4,
        num_examples=2,
        prompt_fn=prompt_fn,
        answer_fn=answer_fn,
    )
    loss = evaluate_loss(model, data, collate, batch_size=3)
    gen = evaluate_generation(model, tok, records[:4], prompt_fn, answer_fn, 2, 3, num_examples=2)
    assert both == {
        **loss,
        "exact_match": gen["exact_match"],
        "exact_match_n": 4,
        "examples": gen["examples"],
    }
    assert len(both["examples"]) == 2
    only_loss = evaluate_model(model, data, collate, tokenizer=tok, records=[], batch_size=3)
    assert only_loss == loss
    assert evaluate_model(model, None, None, tokenizer=None, records=records) == {}
    with pytest.raises(ValueError, match="collate_fn"):
        evaluate_model(model, data, None)
