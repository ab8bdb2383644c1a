"""Shared fixtures: small objects built in memory, never downloaded."""

from __future__ import annotations

import os
from typing import Any

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Parallel workers (`pytest -n auto`) share the cores: one thread each, also in the CLI
    # subprocesses the tests start, instead of every worker spinning a thread per core.
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
# `tilpass train` subprocesses keep the OpenMP runtime's default waiting: on a loaded test
# machine they would otherwise re-run themselves for the passive policy (test_threads.py
# covers that restart).
os.environ.setdefault("TILPASS_WAIT_POLICY", "default")

CHATML_TEMPLATE = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""A ChatML template like SmolLM2's and Qwen's (without their default system prompt)."""

_CORPUS = [
    "What is two plus two? The answer is four.",
    "Summarize the text below in one sentence, please.",
    "The quick brown fox jumps over the lazy dog.",
    "You are a helpful assistant. Translate hello world into Norwegian: hei verden.",
]


def build_tokenizer_json() -> str:
    """Train the tiny byte-level BPE tokenizer in memory and return it as JSON."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # any text encodes, bytes round-trip
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    return tok.to_str()


@pytest.fixture(scope="session")
def _tiny_tokenizer_json() -> str:
    return build_tokenizer_json()


@pytest.fixture
def tiny_tokenizer(_tiny_tokenizer_json: str) -> Any:
    """A byte-level BPE tokenizer with ChatML special tokens and chat template (fresh per test).

    eos is ``<|im_end|>`` (as in SmolLM2-Instruct), pad is ``<pad>``; decoding round-trips text.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json),
        eos_token="<|im_end|>",
        pad_token="<pad>",
        chat_template=CHATML_TEMPLATE,
        name_or_path="tiny-chatml",
        clean_up_tokenization_spaces=False,
    )
