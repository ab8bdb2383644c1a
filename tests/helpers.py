"""Tiny random models built from configs (no downloads) and adapter helpers for tests."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import tilpass

VOCAB = 128


def tiny_llama(
    seed: int = 0, dtype: torch.dtype = torch.float32, vocab_size: int = VOCAB
) -> LlamaForCausalLM:
    """A 2-layer Llama with hidden size 32 in eval mode, identical for the same seed."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


def save_tiny_model(directory: Path, hidden_size: int = 32) -> Path:
    """Save a tiny chat Llama (tied embeddings, byte-level ChatML tokenizer) into `directory`
    as a local Hugging Face model directory; returns it."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from tests.conftest import CHATML_TEMPLATE, build_tokenizer_json

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(build_tokenizer_json()),
        eos_token="<|im_end|>",
        pad_token="<pad>",
        chat_template=CHATML_TEMPLATE,
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """A 2-layer GPT-2 (Conv1D layers) with hidden size 32."""
    torch.manual_seed(seed)
    config = GPT2Config(
        n_embd=32,
        n_layer=2,
        n_head=4,
        vocab_size=VOCAB,
        n_positions=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return GPT2LMHeadModel(config).eval()


def lora(**overrides: object) -> tilpass.LoraConfig:
    """A LoRA config with random (non-zero) A and B, so no test passes vacuously."""
    settings: dict = {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj"],
        "init_lora_weights": False,
    }
    settings.update(overrides)
    return tilpass.LoraConfig(**settings)


def tokens(batch: int = 4, length: int = 6, seed: int = 1) -> torch.Tensor:
    """Random token ids (no padding token)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)
