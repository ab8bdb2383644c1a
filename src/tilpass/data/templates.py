"""Records to token ids with loss masks: chat templates, prompt-loss masking, truncation.

The chat formats go through ``tokenizer.apply_chat_template``. Without a chat template,
``prompt_completion`` is rendered verbatim as ``prompt + completion + eos`` (the data carries
its own format) and ``alpaca`` in the Stanford Alpaca prompt format (``ALPACA_PROMPT``) followed
by ``output + eos``; ``chat`` raises a ``DataError``.

Loss masking: the conversation is rendered once in full, and for each assistant turn ``i`` the
prefix ``messages[:i]`` is rendered with ``add_generation_prompt=True`` (where the answer
starts) and ``messages[:i+1]`` without (where it ends, trailing whitespace after the
end-of-turn token dropped, so the loss is on exactly the answer and e.g. ``<|im_end|>``). Both
must be string prefixes of the full render; the character spans become token labels through
the tokenizer's offset mapping (without offsets: prefix token counts, verified to be a prefix
of the full tokens, else each piece is tokenized separately). If a template is not
prefix-stable (it rewrites earlier turns), only the final assistant turn carries loss: the
text is the render up to and including it, or, if even the generation prompt is not a prefix,
``generation prompt + answer + eos`` (what the model sees at inference). Such examples are
counted in ``DataStats.n_template_fallback``. An assistant turn with no message before it is
context (no prompt to render). Labels are -100 where there is no loss, aligned with
``input_ids`` (the model shifts them).

Over-long examples are cut to ``max_length`` tokens (counted in ``DataStats``).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tilpass.data.sources import DataError, _normalize, _record_format, _RowError
from tilpass.losses import IGNORE_INDEX

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass
class _Rendered:
    text: str
    spans: list[tuple[int, int]]  # character spans that carry loss
    add_special_tokens: bool  # True when the text is not from a chat template
    fallback: bool = False


@dataclass
class _Encoded:
    input_ids: list[int]
    labels: list[int]
    text: str
    truncated: bool
    fallback: bool


def _has_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _tokenizer_name(tokenizer: Any) -> str:
    return getattr(tokenizer, "name_or_path", "") or "<unnamed>"


def _template_name(tokenizer: Any) -> str:
    name = _tokenizer_name(tokenizer)
    if _has_template(tokenizer):
        return f"the chat template of tokenizer '{name}'"
    return f"the fallback format (tokenizer '{name}' has no chat template)"


def _messages(record: Mapping[str, Any], fmt: str) -> list[dict[str, str]]:
    if fmt == "chat":
        return list(record["messages"])
    if fmt == "prompt_completion":
        user, answer = record["prompt"], record["completion"]
    else:
        extra = record.get("input") or ""
        user = record["instruction"] + (f"\n\n{extra}" if extra else "")
        answer = record["output"]
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def _plain_prompt(record: Mapping[str, Any], fmt: str) -> str:
    """The prompt text in the no-template fallback format."""
    if fmt == "prompt_completion":
        return record["prompt"]
    template = ALPACA_PROMPT if record.get("input") else ALPACA_PROMPT_NO_INPUT
    return template.format(instruction=record["instruction"], input=record.get("input") or "")


def _render_chat(tokenizer: Any, messages: list[dict[str, str]], generation: bool) -> str:
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation
        )
    except Exception as e:  # Jinja and template-raised errors are row problems
        raise _RowError(f"{_template_name(tokenizer)} failed on this record ({e})") from e
    return str(text)


def _render(record: Mapping[str, Any], fmt: str, tokenizer: Any) -> _Rendered:
    eos = getattr(tokenizer, "eos_token", None) or ""
    if fmt == "text":
        text = record["text"]
        return _Rendered(text, [(0, len(text))], add_special_tokens=True)
    if not _has_template(tokenizer):
        if fmt == "chat":
            raise DataError(
                f"tokenizer '{_tokenizer_name(tokenizer)}' has no chat template; chat "
                '("messages") data needs one. Use a tokenizer with a chat template (e.g. an '
                "-Instruct model's) or set tokenizer.chat_template."
            )
        prompt = _plain_prompt(record, fmt)
        answer = record["completion"] if fmt == "prompt_completion" else record["output"]
        text = prompt + answer + eos
        return _Rendered(text, [(len(prompt), len(text))], add_special_tokens=True)

    messages = _messages(record, fmt)
    full = _render_chat(tokenizer, messages, generation=False)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i > 0]
    spans = []
    for i in turns:
        start = _render_chat(tokenizer, messages[:i], generation=True)
        end = _render_chat(tokenizer, messages[: i + 1], generation=False)
        if not (full.startswith(start) and full.startswith(end) and len(end) >= len(start)):
            break
        spans.append((len(start), max(len(start), len(end.rstrip()))))
    else:
        return _Rendered(full, spans, add_special_tokens=False)

    # Not prefix-stable: train on the final answer alone, rendered as the model will see it.
    last = turns[-1]
    start = _render_chat(tokenizer, messages[:last], generation=True)
    end = _render_chat(tokenizer, messages[: last + 1], generation=False)
    if end.startswith(start):
        span = (len(start), max(len(start), len(end.rstrip())))
        return _Rendered(end, [span], add_special_tokens=False, fallback=True)
    text = start + messages[last]["content"] + eos
    return _Rendered(text, [(len(start), len(text))], add_special_tokens=False, fallback=True)


def _tokenize(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def _token_mask(tokenizer: Any, rendered: _Rendered) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered text and, per token, whether it overlaps a loss span."""
    text, spans = rendered.text, rendered.spans
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(
            text, add_special_tokens=rendered.add_special_tokens, return_offsets_mapping=True
        )
        ids = list(enc["input_ids"])
        # A token carries loss when its characters overlap a loss span.
        offsets = [(int(a), int(b)) for a, b in enc["offset_mapping"]]
        mask = [a < b and any(a < t and s < b for s, t in spans) for a, b in offsets]
        return ids, mask
    # No offsets: count the tokens of each prefix, verified to be a prefix of the full tokens.
    ids = _tokenize(tokenizer, text, rendered.add_special_tokens)
    cuts: dict[int, int] = {}
    for b in sorted({x for span in spans for x in span}):
        head = _tokenize(tokenizer, text[:b], rendered.add_special_tokens)
        if ids[: len(head)] != head:
            break
        cuts[b] = len(head)
    else:
        mask = [False] * len(ids)
        for s, t in spans:
            mask[cuts[s] : cuts[t]] = [True] * (cuts[t] - cuts[s])
        return ids, mask
    # Token merges across a boundary: tokenize each piece on its own so labels stay aligned.
    bounds = sorted({0, len(text), *(x for span in spans for x in span)})
    ids, mask = [], []
    for a, b in itertools.pairwise(bounds):
        piece = _tokenize(tokenizer, text[a:b], rendered.add_special_tokens and a == 0)
        ids += piece
        mask += [any(s <= a and b <= t for s, t in spans)] * len(piece)
    return ids, mask


def _encode(
    record: Mapping[str, Any],
    fmt: str,
    tokenizer: Any,
    max_length: int,
    train_on_prompt: bool,
) -> _Encoded:
    rendered = _render(record, fmt, tokenizer)
    ids, mask = _token_mask(tokenizer, rendered)
    eos_id = getattr(tokenizer, "eos_token_id", None)
    if fmt == "text" and eos_id is not None and (not ids or ids[-1] != eos_id):
        ids.append(eos_id)
        mask.append(True)
    truncated = len(ids) > max_length
    ids, mask = ids[:max_length], mask[:max_length]
    labels = [t if (m or train_on_prompt) else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)]
    return _Encoded(ids, labels, rendered.text, truncated, rendered.fallback)


def tokenize_record(
    record: Mapping[str, Any],
    tokenizer: Any,
    max_length: int,
    train_on_prompt: bool = False,
    format: str | None = None,
) -> dict[str, list[int]]:
    """Tokenize one record with loss on the answer tokens only (all tokens if train_on_prompt).

    Args:
        record: a record in any of ``FORMATS`` (raw or from ``load_records``).
        tokenizer: a Hugging Face tokenizer; its chat template is used when it has one.
        max_length: examples are cut to this many tokens.
        train_on_prompt: put loss on every token, prompt included.
        format: force a format; detected from the record's keys when None.

    Returns:
        ``input_ids`` and ``labels`` (same length; -100 where there is no loss).
    """
    fmt = _record_format(record, format)
    try:
        enc = _encode(_normalize(record, fmt), fmt, tokenizer, max_length, train_on_prompt)
    except _RowError as e:
        raise DataError(str(e)) from None
    return {"input_ids": enc.input_ids, "labels": enc.labels}


def prompt_ids(record: Mapping[str, Any], tokenizer: Any, format: str | None = None) -> list[int]:
    """Token ids of everything before the final answer, ending in the generation prompt.

    Used for generation-based evaluation: generate from these ids and compare the decoded
    output with ``reference_answer(record)``.
    """
    fmt = _record_format(record, format)
    if fmt == "text":
        raise DataError('a "text" record has no prompt and answer to evaluate')
    try:
        clean = _normalize(record, fmt)
        if not _has_template(tokenizer):
            if fmt == "chat":
                _render(clean, fmt, tokenizer)  # raises the no-template error
            return _tokenize(tokenizer, _plain_prompt(clean, fmt), add_special_tokens=True)
        messages = _messages(clean, fmt)
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        if last == 0:
            raise _RowError("the only assistant message has no message before it")
        text = _render_chat(tokenizer, messages[:last], generation=True)
    except _RowError as e:
        raise DataError(str(e)) from None
    return _tokenize(tokenizer, text, add_special_tokens=False)


def reference_answer(record: Mapping[str, Any], format: str | None = None) -> str:
    """The final answer: the last assistant message, the completion, or the output."""
    fmt = _record_format(record, format)
    try:
        clean = _normalize(record, fmt)
    except _RowError as e:
        raise DataError(str(e)) from None
    if fmt == "chat":
        return [m for m in clean["messages"] if m["role"] == "assistant"][-1]["content"]
    if fmt == "prompt_completion":
        return clean["completion"]
    if fmt == "alpaca":
        return clean["output"]
    raise DataError('a "text" record has no answer to evaluate')
