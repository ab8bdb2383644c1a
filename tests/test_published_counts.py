"""Trainable-parameter counts against published figures and against Hugging Face PEFT.

Llama-2-7B is built on the `meta` device from its config: shapes only, no weights, no download.
LoRA r=8 on q_proj and v_proj is 32 layers x 2 modules x 8 x (4096 + 4096) = 4,194,304
trainable parameters, on top of 6,738,415,616 base parameters.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

transformers = pytest.importorskip("transformers")

import tilpass  # noqa: E402

LLAMA2_7B_TRAINABLE = 4_194_304
LLAMA2_7B_ALL = 6_742_609_920
LLAMA2_7B_LINE = "trainable params: 4,194,304 || all params: 6,742,609,920 || trainable%: 0.0622"


def llama2_7b() -> nn.Module:
    config = transformers.LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    )
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(config)


def test_llama2_7b_lora_r8_q_v_matches_the_published_count(
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = tilpass.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    model = tilpass.get_peft_model(llama2_7b(), config)

    assert model.get_nb_trainable_parameters() == (LLAMA2_7B_TRAINABLE, LLAMA2_7B_ALL)
    model.print_trainable_parameters()
    assert capsys.readouterr().out == LLAMA2_7B_LINE + "\n"


def _peft_counts(config_kwargs: dict[str, Any]) -> tuple[tuple[int, int], Any]:
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(llama2_7b(), peft.LoraConfig(**config_kwargs))
    return model.get_nb_trainable_parameters(), model


def test_peft_agrees_on_llama2_7b_r8_q_v(capsys: pytest.CaptureFixture[str]) -> None:
    counts, model = _peft_counts({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]})
    assert counts == (LLAMA2_7B_TRAINABLE, LLAMA2_7B_ALL)
    model.print_trainable_parameters()
    assert capsys.readouterr().out == LLAMA2_7B_LINE + "\n"


def test_all_linear_r16_counts_equal_peft() -> None:
    kwargs = {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"}
    ours = tilpass.get_peft_model(llama2_7b(), tilpass.LoraConfig(**kwargs))
    theirs, _ = _peft_counts(kwargs)

    # 32 layers x 16 x (q, k, v, o: 4 x (4096 + 4096); gate, up, down: 3 x (4096 + 11008))
    trainable = 32 * 16 * (4 * 8192 + 3 * 15104)
    assert ours.get_nb_trainable_parameters() == theirs == (trainable, 6_738_415_616 + trainable)
