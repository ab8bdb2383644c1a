"""The LoRA + prompt hybrid beyond the per-method matrix: its definition against PEFT's LoRA
with the virtual tokens prepended by hand, its LoRA part in PEFT, merging, serving beside
other methods' adapters, and `tilpass train`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import tilpass
from tests.helpers import lora, tiny_llama, tokens
from tests.reference import prompt_ref
from tests.test_cli import common, data, tiny_model_dir  # noqa: F401
from tests.test_cli import tilpass as tilpass_cli
from tilpass.errors import TargetModulesError
from tilpass.methods.lora_prompt import export_lora

ATOL = 1e-5
TARGETS = ["q_proj", "v_proj", "down_proj"]


def hybrid(n: int = 3, **kw: Any) -> tilpass.LoraPromptConfig:
    settings: dict[str, Any] = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS}
    return tilpass.LoraPromptConfig(
        **{**settings, "init_lora_weights": False, "num_virtual_tokens": n, **kw}
    )


def hybrid_model(seed: int = 2) -> tilpass.AdaptedModel:
    torch.manual_seed(seed)
    return tilpass.get_peft_model(tiny_llama(), hybrid())


def all_logits(model: Any, x: torch.Tensor, **kw: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x, **kw).logits


def test_file_and_lora_part_in_peft(tmp_path: Path) -> None:
    """The hybrid is PEFT's LoRA (its exported LoRA part, loaded by PEFT) run on the virtual
    tokens followed by the token embeddings, at every position."""
    peft = pytest.importorskip("peft")
    model = hybrid_model()
    x = tokens()
    model.save_pretrained(tmp_path / "hybrid")
    config = json.loads((tmp_path / "hybrid" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA_PROMPT" and config["input_embedding"] == (
        "model.embed_tokens"
    )
    tensors = load_file(tmp_path / "hybrid" / "adapter_model.safetensors")
    assert tensors["prompt_embeddings"].shape == (3, 32)
    assert sum(key.endswith("lora_A.weight") for key in tensors) == 3 * 2  # 3 targets x 2 layers
    export_lora(tmp_path / "hybrid", tmp_path / "lora")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "lora").eval()
    assert set(peft.utils.get_peft_model_state_dict(theirs)) == set(tensors) - {"prompt_embeddings"}
    expected = prompt_ref.causal_lm_logits(theirs, tensors["prompt_embeddings"], x).float()
    torch.testing.assert_close(all_logits(model, x), expected, atol=ATOL, rtol=ATOL)
    with pytest.raises(ValueError, match="expected LORA_PROMPT"):
        export_lora(tmp_path / "lora", tmp_path / "again")


def test_merge_folds_lora_and_keeps_the_prompt(tmp_path: Path) -> None:
    model = hybrid_model()
    x = tokens()
    unmerged = all_logits(model, x)
    q_proj = model.base_model.model.layers[0].self_attn.q_proj.weight
    before = q_proj.detach().clone()
    model.merge_adapter()
    assert not torch.equal(q_proj, before)  # the LoRA part is in the weights
    torch.testing.assert_close(all_logits(model, x), unmerged, atol=ATOL, rtol=ATOL)
    assert all_logits(model, x).shape[1] == x.shape[1] + 3  # the virtual tokens stay
    with pytest.raises(ValueError, match="unmerge_adapter"):
        model(input_ids=x, adapter_names=["default"] * x.shape[0])
    model.unmerge_adapter()
    torch.testing.assert_close(q_proj, before, atol=1e-6, rtol=0)
    model.save_pretrained(tmp_path)  # saved and reloaded as one unit
    loaded = tilpass.AdaptedModel.from_pretrained(tiny_llama(), tmp_path)
    assert torch.equal(all_logits(loaded, x), unmerged)


def test_served_beside_lora_and_prompt_adapters() -> None:
    torch.manual_seed(4)
    model = tilpass.get_peft_model(tiny_llama(), lora(), adapter_name="lora")
    model.add_adapter("prompt", tilpass.PromptTuningConfig(num_virtual_tokens=5))
    model.add_adapter("hybrid", hybrid(2))
    x = tokens(batch=4, length=5)
    names = ["hybrid", "lora", "prompt", "__base__"]
    mixed = all_logits(model, x, adapter_names=names)[:, -x.shape[1] :]
    for i, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                alone = all_logits(model, x)
        else:
            model.set_adapter(name)
            alone = all_logits(model, x)
        torch.testing.assert_close(mixed[i], alone[i, -x.shape[1] :], atol=ATOL, rtol=ATOL)
    kw: dict[str, Any] = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    out = model.generate(input_ids=x, adapter_names=names, **kw)
    model.set_adapter("hybrid")
    assert torch.equal(out[0], model.generate(input_ids=x[:1], **kw)[0])


def test_lora_on_the_embedding_is_refused() -> None:
    with pytest.raises(TargetModulesError, match="virtual tokens"):
        tilpass.get_peft_model(tiny_llama(), hybrid(target_modules=["embed_tokens", "q_proj"]))


@pytest.mark.parametrize(
    ("method", "settings", "keys"),
    [
        ("prompt_tuning", [], 1),
        ("lora+prompt", ["--lora+prompt.target_modules", "[q_proj]", "--lora+prompt.r", "4"], 5),
    ],
)
def test_train_end_to_end(
    method: str,
    settings: list[str],
    keys: int,
    tmp_path: Path,
    tiny_model_dir: Path,  # noqa: F811
    data: tuple[Path, Path],  # noqa: F811
) -> None:
    from transformers import AutoModelForCausalLM

    train, test = data
    out = tmp_path / "run"
    tilpass_cli(
        "train",
        *common(tiny_model_dir, train, test, out, steps=2, lora=False),
        "--method",
        method,
        f"--{method}.num_virtual_tokens",
        "4",
        *settings,
        cwd=tmp_path,
    )
    adapter = out / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == tilpass.methods.method_named(method).peft_type
    tensors = load_file(adapter / "adapter_model.safetensors")
    assert len(tensors) == keys and tensors["prompt_embeddings"].shape == (4, 32)
    model = tilpass.AdaptedModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter
    )
    saved = model.adapter_state_dict("default")
    assert all(torch.equal(saved[key], value) for key, value in tensors.items())
