"""Evaluation metrics: next-token loss / perplexity and greedy exact-match generation.

The causal-LM loss lives here too, because training and evaluation must compute the very
same number. It is a *summed* cross-entropy plus a token count, so callers can normalise
over any group of micro-batches (gradient accumulation) or a whole evaluation set::

    loss = sum_{b, t : labels[b, t+1] != -100} CE(head(h[b, t]), labels[b, t+1])

With ``selective=True`` the language-model head runs only on the hidden states ``h[b, t]``
that carry loss, instead of on every position: with 49k-token vocabularies the full
``(B, T, V)`` logits tensor dominates time and memory.
"""

from __future__ import annotations

import math
import string
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from tilpass.losses import linear_cross_entropy

IGNORE_INDEX = -100
# Trailing characters dropped by answer normalisation (ASCII and common CJK punctuation).
_TRAILING_PUNCT = string.punctuation + "。！？、，．…"

Batch = dict[str, torch.Tensor]


def unwrap_base(model: nn.Module) -> nn.Module:
    """Return the transformers model under an adapter wrapper, or the model itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a parameter-less module)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """Split a causal LM into (decoder body, output head), or None if it has no such structure."""
    base = unwrap_base(model)
    get_head = getattr(base, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    get_decoder = getattr(base, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else getattr(base, "model", None)
    if not isinstance(head, nn.Module) or not isinstance(decoder, nn.Module) or decoder is base:
        return None
    return decoder, head


def trim_padding(batch: Batch) -> Batch:
    """Drop trailing columns that are padding in every row (right-padded batches only)."""
    mask = batch.get("attention_mask")
    if mask is None or mask.dim() != 2:
        return batch
    used = mask.bool().any(dim=0).nonzero()
    width = mask.shape[1]
    end = int(used[-1]) + 1 if used.numel() else width
    if end == width:
        return batch
    return {
        k: v[:, :end] if torch.is_tensor(v) and v.dim() == 2 and v.shape[1] == width else v
        for k, v in batch.items()
    }


def count_loss_tokens(batch: Batch) -> int:
    """Number of positions whose next-token label is not ignored."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def _logits_of(output: Any) -> torch.Tensor:
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)):
        return output[0]
    return output


def _hidden_of(output: Any) -> torch.Tensor:
    if hasattr(output, "last_hidden_state"):
        return output.last_hidden_state
    if isinstance(output, (tuple, list)):
        return output[0]
    return output


def _hf_kwargs(model: nn.Module) -> dict[str, Any]:
    # Transformers models accept use_cache; a plain nn.Module may not.
    return {"use_cache": False} if hasattr(unwrap_base(model), "config") else {}


def causal_lm_loss(
    model: nn.Module, batch: Batch, selective: bool = True
) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over positions that carry loss, and their count.

    Args:
        model: A causal LM (transformers model, adapter wrapper, or any module returning logits).
        batch: ``input_ids``, ``labels`` (-100 = ignored) and optionally ``attention_mask``.
        selective: Run the head only where loss is taken (needs a decoder/head split; falls back
            to the full forward otherwise).

    Returns:
        (summed loss as a scalar tensor in at least float32, number of loss tokens).
    """
    input_ids, labels = batch["input_ids"], batch["labels"]
    mask = batch.get("attention_mask")
    target = labels[:, 1:]  # (B, T-1)
    keep = target != IGNORE_INDEX  # (B, T-1)
    parts = decoder_and_head(model) if selective else None
    if parts is not None:
        decoder, head = parts
        hidden = _hidden_of(
            decoder(input_ids=input_ids, attention_mask=mask, **_hf_kwargs(model))
        )  # (B, T, H)
        selected = hidden[:, :-1][keep]  # (N, H)
        # A frozen head (LoRA) goes blockwise: the (N, V) logits are never materialised. A
        # trained head stays on the plain path: blockwise, each block would update the whole
        # (V, H) weight gradient, which costs more than the logits it saves (benchmarked).
        if type(head) is nn.Linear and not head.weight.requires_grad:
            loss = linear_cross_entropy(selected, head.weight, head.bias, target[keep])
            return loss, int(keep.sum())
        logits = head(selected)  # (N, V)
    else:
        out = model(input_ids=input_ids, attention_mask=mask, **_hf_kwargs(model))
        logits = _logits_of(out)[:, :-1][keep]  # (N, V)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    loss = F.cross_entropy(logits, target[keep], reduction="sum")
    return loss, int(keep.sum())


def selective_loss_matches(
    model: nn.Module, batch: Batch, autocast: AbstractContextManager[Any] | None = None
) -> bool:
    """Check once that the selective loss equals the full-forward loss on ``batch``.

    Catches wrappers whose forward does more than decoder + head (prompt tuning's virtual
    tokens, logit soft-capping or scaling), for which the selective path would be wrong.
    """
    if decoder_and_head(model) is None:
        return False
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast or nullcontext():
            fast, _ = causal_lm_loss(model, batch, selective=True)
            full, _ = causal_lm_loss(model, batch, selective=False)
    finally:
        model.train(was_training)
    low_precision = autocast is not None and getattr(autocast, "fast_dtype", None) in (
        torch.bfloat16,
        torch.float16,
    )
    tol = 2e-2 if low_precision else 1e-4
    return bool(torch.isclose(fast.double(), full.double(), rtol=tol, atol=tol))


def _batches(dataset: Dataset, batch_size: int) -> Iterator[list[Any]]:
    n = len(dataset)  # type: ignore[arg-type]
    for start in range(0, n, batch_size):
        yield [dataset[i] for i in range(start, min(start + batch_size, n))]


def to_device(batch: Batch, device: torch.device) -> Batch:
    """Move every tensor in a batch to ``device``."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


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
