"""Trainable-parameter counts against the published figure, on a model that has no weights."""

from __future__ import annotations

import peft
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import tilpass


def llama2_7b_on_meta() -> LlamaForCausalLM:
    """Llama-2-7B's architecture on the meta device: shapes only, no memory, no download."""
    config = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    )
    with torch.device("meta"):
        return LlamaForCausalLM(config)


def test_llama2_7b_lora_r8_q_v_is_4194304(capsys: pytest.CaptureFixture[str]) -> None:
    model = tilpass.get_peft_model(
        llama2_7b_on_meta(), tilpass.LoraConfig(r=8, target_modules=["q_proj", "v_proj"])
    )
    assert model.get_nb_trainable_parameters() == (4_194_304, 6_742_609_920)
    model.print_trainable_parameters()
    assert capsys.readouterr().out == (
        "trainable params: 4,194,304 || all params: 6,742,609,920 || trainable%: 0.0622\n"
    )


@pytest.mark.parametrize("target", [["q_proj", "v_proj"], "all-linear"])
def test_counts_equal_peft(target: list[str] | str) -> None:
    ours = tilpass.get_peft_model(
        llama2_7b_on_meta(), tilpass.LoraConfig(r=16, target_modules=target)
    )
    theirs = peft.get_peft_model(llama2_7b_on_meta(), peft.LoraConfig(r=16, target_modules=target))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
