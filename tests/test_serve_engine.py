"""The serving engine in-process, without HTTP: its packed path (one forward pass per step,
a KV slot per sequence, prompts fed in chunks) and its padded path give every request what
its adapter's own `generate` gives, token for token, while rows of every method join and
leave a batch of 4; a stopping engine answers 503."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch
from helpers import tiny_llama
from serve_helpers import ADAPTERS, CONTEXT, VOCAB, with_adapters

from tilpass.serve.adapters import AdapterCache
from tilpass.serve.engine import Engine, Event, Overloaded, Request
from tilpass.serve.sampling import SamplingParams

PROMPTS = ([5, 6, 7, 8, 9], [40, 41], [100, 7, 250, 33, 12, 9, 61])


@pytest.fixture(scope="module")
def model() -> Any:
    base = tiny_llama(vocab_size=VOCAB)
    base.config.max_position_embeddings = CONTEXT
    return with_adapters(base)


class Collected:
    """A request's sink: its tokens, and an event set when it finished or failed."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.events: list[Event] = []
        self.done = threading.Event()

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        if event.token is not None:
            self.tokens.append(event.token)
        if event.kind in ("finish", "error"):
            self.done.set()


def reference(model: Any, adapter: str | None, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), adapter_names=[adapter or "__base__"],
            max_new_tokens=n, do_sample=False,
        )  # fmt: skip
    return out[0, len(prompt) :].tolist()


def engine_for(model: Any, tokenizer: Any, **kwargs: Any) -> Engine:
    cache = AdapterCache(model, None, max_count=8, max_bytes=1 << 30)
    for name in ADAPTERS:
        cache.adopt(name)
    return Engine(model, tokenizer, cache, max_batch=4, max_queue=64, **kwargs)


@pytest.mark.parametrize("packed, step_tokens", [(True, 6), (False, 512)])
def test_every_row_equals_its_adapters_generate(
    model: Any, tiny_tokenizer: Any, packed: bool, step_tokens: int
) -> None:
    """Nine requests of every method and the base, of different lengths, through 4 rows:
    rows join while others decode and leave at different steps (the packed path also feeds
    the longest prompt in chunks of a 6-token step budget)."""
    engine = engine_for(model, tiny_tokenizer, packed=packed, max_step_tokens=step_tokens)
    assert engine.use_packed is packed
    jobs = [(a, PROMPTS[2], 4 + i) for i, a in enumerate(ADAPTERS)]
    jobs += [(None, PROMPTS[0], 12), ("lora_b", PROMPTS[1], 3), (None, PROMPTS[1], 9)]
    sinks = []
    for i, (adapter, prompt, n) in enumerate(jobs):
        sinks.append(Collected())
        params = SamplingParams(max_tokens=n, temperature=0.0)
        engine.submit(Request(str(i), adapter, prompt, params, sinks[-1]))
    engine.start()
    try:
        for sink in sinks:
            assert sink.done.wait(60), "the engine did not finish"
    finally:
        engine.stop(5)
    base = {tuple(p): reference(model, None, p, 12) for p in PROMPTS}
    for (adapter, prompt, n), sink in zip(jobs, sinks, strict=True):
        assert sink.events[-1].kind == "finish", sink.events[-1]
        assert sink.tokens == reference(model, adapter, prompt, n), adapter
        if adapter is not None and prompt == PROMPTS[2]:  # not vacuous: each one matters
            assert sink.tokens != base[tuple(prompt)][: len(sink.tokens)], adapter


def test_the_packed_path_is_chosen_for_sdpa_models_only(model: Any, tiny_tokenizer: Any) -> None:
    assert engine_for(model, tiny_tokenizer).use_packed
    config = model.get_base_model().config
    previous = config._attn_implementation
    config._attn_implementation = "eager"
    try:
        assert not engine_for(model, tiny_tokenizer).use_packed
    finally:
        config._attn_implementation = previous


def test_a_stopping_engine_answers_503(model: Any, tiny_tokenizer: Any) -> None:
    """Waiting requests get 503 at once; running ones after the grace period; new ones are
    refused with 503."""
    engine = engine_for(model, tiny_tokenizer)
    running, waiting = Collected(), Collected()
    long = SamplingParams(max_tokens=CONTEXT - 10, temperature=0.0, ignore_eos=True)
    engine.submit(Request("run", "lora_a", PROMPTS[0], long, running))
    engine.max_batch = 1  # the second request waits behind the first
    engine.submit(Request("wait", "lora_b", PROMPTS[1], long, waiting))
    engine.start()
    while not running.tokens:
        threading.Event().wait(0.01)
    engine.begin_stop(0.2)
    assert waiting.done.wait(5) and waiting.events[-1].status == 503
    with pytest.raises(Overloaded) as refused:
        engine.submit(Request("late", None, PROMPTS[0], long, Collected()))
    assert refused.value.status == 503
    assert running.done.wait(10)
    assert running.events[-1].kind == "error" and running.events[-1].status == 503
    assert 0 < len(running.tokens) < long.max_tokens
    engine.stop(1)
    assert not engine.thread.is_alive()
