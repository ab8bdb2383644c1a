"""Evaluation: next-token loss / perplexity over a dataset and greedy exact-match generation.

:func:`evaluate_model` is the one entry point that training and the CLI share; it combines
:func:`evaluate_loss` (the training loss of :mod:`tilpass.losses`, token-weighted over a
dataset) and :func:`evaluate_generation` (batched greedy decoding scored by normalised exact
match).
"""

from __future__ import annotations

import math
import string
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from tilpass.losses import (
    Batch,
    causal_lm_loss,
    model_device,
    selective_loss_matches,
    to_device,
    trim_padding,
    unwrap_base,
)

# Trailing characters dropped by answer normalisation (ASCII and common CJK punctuation).
_TRAILING_PUNCT = string.punctuation + "。！？、，．…"


def _batches(dataset: Dataset, batch_size: int) -> Iterator[list[Any]]:
    n = len(dataset)  # type: ignore[arg-type]
    for start in range(0, n, batch_size):
        yield [dataset[i] for i in range(start, min(start + batch_size, n))]


def evaluate_loss(
    model: nn.Module,
    dataset: Dataset,
    collate_fn: Callable[[list[Any]], Batch],
    batch_size: int = 8,
    *,
    selective: bool | None = None,
    autocast: AbstractContextManager[Any] | None = None,
) -> dict[str, float]:
    """Token-weighted mean next-token loss over a dataset.

    Args:
        model: The model to evaluate (put in eval mode for the call, then restored).
        dataset: Items accepted by ``collate_fn`` (``input_ids`` / ``labels`` lists).
        collate_fn: Turns a list of items into a padded batch of tensors.
        batch_size: Examples per forward pass.
        selective: Force the selective head on/off; None verifies it on the first batch.
        autocast: Optional autocast context (bf16) used around the forward passes.

    Returns:
        ``loss`` (mean per token), ``perplexity`` (exp of it) and ``tokens`` (count).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = model_device(model)
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    tokens = 0
    try:
        for items in _batches(dataset, batch_size):
            batch = to_device(trim_padding(collate_fn(items)), device)
            if selective is None:
                selective = selective_loss_matches(model, batch, autocast)
            with torch.no_grad(), autocast or nullcontext():
                loss, n = causal_lm_loss(model, batch, selective=selective)
            total += loss.double()
            tokens += n
    finally:
        model.train(was_training)
    if tokens == 0:
        return {"loss": float("nan"), "perplexity": float("nan"), "tokens": 0}
    mean = float(total) / tokens
    ppl = math.exp(mean) if mean < 700 else float("inf")
    return {"loss": mean, "perplexity": ppl, "tokens": tokens}


def normalize_answer(text: str) -> str:
    """Normalise for exact match: strip, casefold, collapse spaces, drop trailing punctuation."""
    text = " ".join(text.strip().casefold().split())
    return text.rstrip(_TRAILING_PUNCT).rstrip()


def _eos_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    sources = [getattr(tokenizer, "eos_token_id", None)]
    gen_cfg = getattr(unwrap_base(model), "generation_config", None)
    sources.append(getattr(gen_cfg, "eos_token_id", None))
    for src in sources:
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(int(i) for i in src)
    return ids


def _left_pad(rows: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row) :] = 1
    return ids, mask


def evaluate_generation(
    model: nn.Module,
    tokenizer: Any,
    records: Sequence[Any],
    prompt_fn: Callable[[Any, Any], list[int]],
    answer_fn: Callable[[Any], str],
    max_new_tokens: int = 64,
    batch_size: int = 8,
    *,
    num_examples: int = 5,
) -> dict[str, Any]:
    """Greedy, left-padded, batched generation scored by normalised exact match.

    Args:
        model: Anything with a Hugging Face style ``generate`` (model, PeftModel, AdaptedModel).
        tokenizer: Provides ``decode``, ``pad_token_id`` / ``eos_token_id``.
        records: Raw evaluation records.
        prompt_fn: ``(record, tokenizer) -> prompt token ids``.
        answer_fn: ``record -> reference answer``.
        max_new_tokens: Generation budget per prompt.
        batch_size: Prompts per ``generate`` call.
        num_examples: How many (prompt, prediction, reference) examples to return.

    Returns:
        ``exact_match`` (fraction in [0, 1]), ``n`` (records scored), ``examples`` (list of dicts).
    """
    if not records:
        return {"exact_match": float("nan"), "n": 0, "examples": []}
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        pad_id = getattr(tokenizer, "eos_token_id", None)
    if pad_id is None:
        raise ValueError(
            "evaluate_generation needs a tokenizer with pad_token_id or eos_token_id; "
            "set tokenizer.pad_token = tokenizer.eos_token (or add a pad token)."
        )
    eos = _eos_ids(model, tokenizer)
    prompts = [list(prompt_fn(r, tokenizer)) for r in records]
    # Longest first: batches of similar length waste less padding; order is restored below.
    order = sorted(range(len(records)), key=lambda i: -len(prompts[i]))
    predictions: list[str] = [""] * len(records)
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            ids, mask = _left_pad([prompts[i] for i in chunk], pad_id)
            with torch.no_grad():
                out = model.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=pad_id,
                )
            new = out[:, ids.shape[1] :].tolist()  # (B, new tokens)
            for i, row in zip(chunk, new, strict=True):
                cut = next((j for j, t in enumerate(row) if t in eos), len(row))
                predictions[i] = tokenizer.decode(row[:cut], skip_special_tokens=True)
    finally:
        model.train(was_training)
    matches = 0
    examples: list[dict[str, Any]] = []
    for i, record in enumerate(records):
        reference = answer_fn(record)
        ok = normalize_answer(predictions[i]) == normalize_answer(reference)
        matches += ok
        if len(examples) < num_examples:
            examples.append(
                {
                    "prompt": tokenizer.decode(prompts[i], skip_special_tokens=True),
                    "prediction": predictions[i],
                    "reference": reference,
                    "match": ok,
                }
            )
    return {"exact_match": matches / len(records), "n": len(records), "examples": examples}


def default_record_fns() -> tuple[Callable[[Any, Any], list[int]], Callable[[Any], str]]:
    """``(prompt_fn, answer_fn)`` for tilpass's own record formats (``tilpass.data``)."""
    from tilpass.data import prompt_ids, reference_answer

    return prompt_ids, reference_answer


def evaluate_model(
    model: nn.Module,
    dataset: Dataset | None,
    collate_fn: Callable[[list[Any]], Batch] | None,
    *,
    tokenizer: Any = None,
    records: Sequence[Any] | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    generation_samples: int = 0,
    num_examples: int = 5,
    prompt_fn: Callable[[Any, Any], list[int]] | None = None,
    answer_fn: Callable[[Any], str] | None = None,
    selective: bool | None = None,
    autocast: AbstractContextManager[Any] | None = None,
) -> dict[str, Any]:
    """Loss / perplexity on a tokenized dataset and exact match on raw records, as available.

    Args:
        model: The model to evaluate (put in eval mode for the call, then restored).
        dataset: Tokenized items for the loss; None or empty skips the loss metrics.
        collate_fn: Pads a list of items into a batch (needed with ``dataset``).
        tokenizer: With ``records``, enables greedy exact-match generation.
        records: Raw records for generation; None or empty skips it.
        batch_size: Examples per forward pass and prompts per ``generate`` call.
        max_new_tokens: Generation budget per prompt.
        generation_samples: Score only the first N records (0: all of them).
        num_examples: How many (prompt, prediction, reference) examples to return.
        prompt_fn: ``(record, tokenizer) -> ids``; default ``tilpass.data.prompt_ids``.
        answer_fn: ``record -> str``; default ``tilpass.data.reference_answer``.
        selective: Force the selective head on/off; None verifies it on the first batch.
        autocast: Optional autocast context (bf16) around forward passes and generation.

    Returns:
        ``loss``, ``perplexity``, ``tokens`` (with a dataset) and ``exact_match``,
        ``exact_match_n``, ``examples`` (with a tokenizer and records); empty if neither.
    """
    out: dict[str, Any] = {}
    if dataset is not None and len(dataset) > 0:  # type: ignore[arg-type]
        if collate_fn is None:
            raise ValueError("evaluate_model: a dataset needs a collate_fn to batch it")
        out |= evaluate_loss(
            model, dataset, collate_fn, batch_size, selective=selective, autocast=autocast
        )
    if tokenizer is not None and records:
        if prompt_fn is None or answer_fn is None:
            default_prompt, default_answer = default_record_fns()
            prompt_fn, answer_fn = prompt_fn or default_prompt, answer_fn or default_answer
        sample = list(records[:generation_samples] if generation_samples else records)
        with autocast or nullcontext():
            gen = evaluate_generation(
                model,
                tokenizer,
                sample,
                prompt_fn,
                answer_fn,
                max_new_tokens,
                batch_size,
                num_examples=num_examples,
            )
        out |= {"exact_match": gen["exact_match"], "exact_match_n": gen["n"]}
        out["examples"] = gen["examples"]
    return out
