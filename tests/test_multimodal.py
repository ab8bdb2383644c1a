"""Adapters on a vision-language model: LoRA and bottleneck adapters on the language model, the
vision tower or both, chosen by module-name regexes (a tiny random LLaVA built from configs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import tilpass
from tilpass.layers import AdapterLayer
from tilpass.methods.bottleneck import BottleneckConfig

IMAGE_TOKEN = 127
LANGUAGE, VISION = r"model\.language_model\.", r"model\.vision_tower\."
TOWERS = {"language": LANGUAGE, "vision": VISION, "both": rf"(?:{LANGUAGE}|{VISION})"}


def tiny_llava(seed: int = 0) -> LlavaForConditionalGeneration:
    """LLaVA with a 2-layer CLIP vision tower (16 x 16 images, 4 patches) and a 2-layer Llama."""
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=16,
        patch_size=8,
        projection_dim=32,
    )
    text = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_TOKEN,
        vision_feature_layer=-1,
    )
    return LlavaForConditionalGeneration(config).eval()


def inputs() -> dict[str, torch.Tensor]:
    """Two rows of text, each with one image's 4 image tokens, and the two images."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 120, (2, 10), generator=generator)
    ids[:, 1:5] = IMAGE_TOKEN
    pixels = torch.randn(2, 3, 16, 16, generator=generator)
    return {"input_ids": ids, "pixel_values": pixels}


def lora_config(tower: str) -> tilpass.LoraConfig:
    layers = rf"{TOWERS[tower]}(?:encoder\.)?layers\.\d+\.self_attn\.(?:q_proj|v_proj)"
    return tilpass.LoraConfig(r=4, lora_alpha=8, target_modules=layers, init_lora_weights=False)


def bottleneck_config(tower: str) -> BottleneckConfig:
    return BottleneckConfig(
        bottleneck_size=4,
        init_weights=False,
        attention_output_modules=rf"{TOWERS[tower]}.*\.(?:o_proj|out_proj)",
        mlp_modules=rf"{TOWERS[tower]}.*\.mlp",
    )


CONFIGS = {"lora": lora_config, "bottleneck": bottleneck_config}


def logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs()).logits


@pytest.mark.parametrize("tower", ["language", "vision", "both"])
@pytest.mark.parametrize("method", ["lora", "bottleneck"])
def test_targets_train_and_round_trip(method: str, tower: str, tmp_path: Path) -> None:
    torch.manual_seed(2)
    model = tilpass.get_peft_model(tiny_llava(), CONFIGS[method](tower))
    wrapped = [n for n, m in model.base_model.named_modules() if isinstance(m, AdapterLayer)]
    in_language = {"language_model" in n for n in wrapped}
    assert in_language == {"language": {True}, "vision": {False}, "both": {True, False}}[tower]

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapter = {id(p) for p in model.adapter_parameters("default")}
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        batch = inputs()
        model(**batch, labels=batch["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    for name, param in model.named_parameters():
        changed = not torch.equal(param, before[name])
        assert changed == (id(param) in adapter), name

    model.save_pretrained(tmp_path)
    loaded = tilpass.AdaptedModel.from_pretrained(tiny_llava(), tmp_path)
    assert torch.equal(logits(loaded), logits(model))
    with model.disable_adapter():
        assert not torch.allclose(logits(model), logits(loaded))


def test_lora_on_both_towers_interoperates_with_peft(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    pattern = lora_config("both").target_modules
    torch.manual_seed(3)
    theirs = peft.get_peft_model(
        tiny_llava(),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=pattern, init_lora_weights=False),
    ).eval()
    theirs.save_pretrained(tmp_path / "peft")
    ours = tilpass.AdaptedModel.from_pretrained(tiny_llava(), tmp_path / "peft")
    torch.testing.assert_close(logits(ours), logits(theirs), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits(ours), logits(tiny_llava()))

    torch.manual_seed(4)
    model = tilpass.get_peft_model(tiny_llava(), lora_config("both"))
    model.save_pretrained(tmp_path / "ours")
    loaded = peft.PeftModel.from_pretrained(tiny_llava(), tmp_path / "ours").eval()
    ours_keys = set(model.adapter_state_dict("default"))
    assert ours_keys == set(peft.utils.get_peft_model_state_dict(loaded))
    torch.testing.assert_close(logits(loaded), logits(model), atol=1e-5, rtol=1e-5)
