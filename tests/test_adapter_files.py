"""Adapter files: the PEFT layout, atomic writes, strict loading and the errors a user sees."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import tilpass
from tests.helpers import lora, tiny_gpt2, tiny_llama, tokens
from tilpass.adapter_files import atomic_write_bytes, file_sha256


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits


def saved(tmp_path: Path, **overrides: object) -> tuple[Path, torch.Tensor]:
    model = tilpass.get_peft_model(tiny_llama(), lora(**overrides))
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter", logits(model, tokens())


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"use_dora": True},
        {"use_rslora": True, "rank_pattern": {"v_proj": 2}},
        {"target_modules": ["embed_tokens", "q_proj"]},
        {"lora_dropout": 0.1},
    ],
)
def test_save_load_gives_identical_logits(tmp_path: Path, overrides: dict) -> None:
    directory, expected = saved(tmp_path, **overrides)
    assert sorted(p.name for p in directory.iterdir()) == [
        "README.md",  # the model card PEFT also writes
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    loaded = tilpass.AdaptedModel.from_pretrained(tiny_llama(), directory)
    assert torch.equal(logits(loaded, tokens()), expected)
    assert not any(p.requires_grad for p in loaded.parameters())  # is_trainable=False
    trainable = tilpass.AdaptedModel.from_pretrained(tiny_llama(), directory, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] > 0


def test_file_layout_and_keys(tmp_path: Path) -> None:
    directory, _ = saved(tmp_path, use_dora=True)
    config = json.loads((directory / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["inference_mode"] is True
    keys = load_file(directory / "adapter_model.safetensors")
    prefix = "base_model.model.model.layers.0.self_attn.q_proj."
    assert keys[prefix + "lora_A.weight"].shape == (4, 32)  # (r, in)
    assert keys[prefix + "lora_B.weight"].shape == (32, 4)  # (out, r)
    assert keys[prefix + "lora_magnitude_vector"].shape == (32,)
    assert all(k.startswith("base_model.model.") and "default" not in k for k in keys)
    assert len(keys) == 2 * 2 * 3  # two layers, two modules, A + B + magnitude


def test_named_adapters_save_in_subdirectories(tmp_path: Path) -> None:
    model = tilpass.get_peft_model(tiny_gpt2(), lora(target_modules=["c_attn"]))
    model.add_adapter("legal", lora(target_modules=["c_proj"]))
    model.set_adapter("legal")
    expected = logits(model, tokens())
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert (tmp_path / "legal" / "adapter_model.safetensors").is_file()
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    only = tmp_path / "only"
    model.save_pretrained(only, selected_adapters=["legal"])
    assert not (only / "adapter_model.safetensors").exists()
    loaded = tilpass.AdaptedModel.from_pretrained(tiny_gpt2(), tmp_path / "legal", "legal")
    assert torch.equal(logits(loaded, tokens()), expected)


def test_modules_to_save_round_trip(tmp_path: Path) -> None:
    model = tilpass.get_peft_model(tiny_llama(), lora(modules_to_save=["lm_head"]))
    with torch.no_grad():
        model.base_model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    expected = logits(model, tokens())
    with pytest.warns(UserWarning, match="lm_head"):
        model.save_pretrained(tmp_path)
    assert "base_model.model.lm_head.weight" in load_file(tmp_path / "adapter_model.safetensors")
    loaded = tilpass.AdaptedModel.from_pretrained(tiny_llama(), tmp_path)
    assert torch.equal(logits(loaded, tokens()), expected)


def test_pickle_is_refused_by_default_and_read_weights_only_on_request(
    tmp_path: Path,
) -> None:
    directory, expected = saved(tmp_path)
    tensors = load_file(directory / "adapter_model.safetensors")
    (directory / "adapter_model.safetensors").unlink()
    torch.save(tensors, directory / "adapter_model.bin")
    for refused in ({}, {"allow_pickle": False}):
        with pytest.raises(tilpass.AdapterFileError, match=r"adapter_model\.bin: pickle files"):
            tilpass.AdaptedModel.from_pretrained(tiny_llama(), directory, **refused)
    loaded = tilpass.AdaptedModel.from_pretrained(tiny_llama(), directory, allow_pickle=True)
    assert torch.equal(logits(loaded, tokens()), expected)


def test_pickle_with_code_is_refused_even_when_allowed(tmp_path: Path) -> None:
    directory, _ = saved(tmp_path)
    (directory / "adapter_model.safetensors").unlink()
    torch.save({"x": torch.zeros(1), "evil": print}, directory / "adapter_model.bin")
    with pytest.raises(tilpass.AdapterFileError, match="cannot be read"):
        tilpass.AdaptedModel.from_pretrained(tiny_llama(), directory, allow_pickle=True)


def test_truncated_safetensors_names_the_file(tmp_path: Path) -> None:
    directory, _ = saved(tmp_path)
    path = directory / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(tilpass.AdapterFileError, match=r"adapter_model\.safetensors.*truncated"):
        tilpass.AdaptedModel.from_pretrained(tiny_llama(), directory)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "adapter_config.json: missing"),
        ("{not json", "not valid JSON"),
        ('["a"]', "expected a JSON object"),
        ('{"r": 8}', "missing required keys: {'peft_type'}"),
        ('{"peft_type": "LOHA"}', "peft_type 'LOHA' is not supported"),
        ('{"peft_type": "LORA", "r": 0, "target_modules": ["q_proj"]}', "r must be a positive"),
    ],
)
def test_bad_config_file(tmp_path: Path, content: str | None, message: str) -> None:
    directory, _ = saved(tmp_path)
    config = directory / "adapter_config.json"
    config.unlink()
    if content is not None:
        config.write_text(content)
    with pytest.raises(tilpass.AdapterFileError, match=message) as info:
        tilpass.AdaptedModel.from_pretrained(tiny_llama(), directory)
    assert str(directory) in str(info.value)


def test_unknown_config_field_warns_and_is_ignored(tmp_path: Path) -> None:
    directory, expected = saved(tmp_path)
    path = directory / "adapter_config.json"
    data = json.loads(path.read_text())
    data["from_the_future"] = "yes"
    path.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="from_the_future"):
        loaded = tilpass.AdaptedModel.from_pretrained(tiny_llama(), directory)
    assert torch.equal(logits(loaded, tokens()), expected)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(tilpass.AdapterFileError, match="no such adapter directory"):
        tilpass.AdaptedModel.from_pretrained(tiny_llama(), tmp_path / "nope")


def _rewrite(directory: Path, edit: object) -> None:
    path = directory / "adapter_model.safetensors"
    tensors = load_file(path)
    save_file(edit(tensors), path)  # type: ignore[operator]


def test_wrong_prefix_is_not_a_silent_no_op(tmp_path: Path) -> None:
    directory, _ = saved(tmp_path)
    _rewrite(
        directory, lambda t: {k.replace("base_model.model.", "model."): v for k, v in t.items()}
    )
    model = tilpass.AdaptedModel(tiny_llama())
    with pytest.raises(tilpass.AdapterFileError, match=r"8 missing keys.*8 unexpected keys"):
        model.load_adapter(directory, "default")
    assert "default" not in model.peft_config  # a failed load leaves the model as it was
    assert set(model.base_model.state_dict()) == set(tiny_llama().state_dict())


def test_missing_keys_name_the_keys_and_allow_partial(tmp_path: Path) -> None:
    directory, _ = saved(tmp_path)
    dropped = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    kept = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"
    original = load_file(directory / "adapter_model.safetensors")
    _rewrite(directory, lambda t: {k: v for k, v in t.items() if k != dropped})
    with pytest.raises(
        tilpass.AdapterFileError, match="1 missing keys: " + dropped.replace(".", r"\.")
    ):
        tilpass.AdaptedModel.from_pretrained(tiny_llama(), directory)
    base = tiny_llama()
    torch.manual_seed(99)  # the key not in the file keeps a fresh init, unlike the saved one
    with pytest.warns(UserWarning, match="partial load"):
        model = tilpass.AdaptedModel.from_pretrained(base, directory, allow_partial=True)
    layers = model.base_model.model.layers
    assert torch.equal(layers[0].self_attn.v_proj.lora_B["default"], original[kept])
    assert not torch.equal(layers[1].self_attn.v_proj.lora_B["default"], original[dropped])


def test_shape_mismatch_names_key_and_shapes(tmp_path: Path) -> None:
    directory, _ = saved(tmp_path)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    _rewrite(directory, lambda t: {**t, key: torch.zeros(4, 33)})
    with pytest.raises(
        tilpass.AdapterFileError,
        match=r"q_proj\.lora_A\.weight has shape \(4, 33\), "
        r"the model expects \(4, 32\)",
    ):
        tilpass.AdaptedModel.from_pretrained(tiny_llama(), directory)


def test_adapter_for_another_model_is_refused(tmp_path: Path) -> None:
    model = tilpass.get_peft_model(tiny_gpt2(), lora(target_modules=["c_attn"]))
    model.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    data["target_modules"] = ["q_proj"]  # a name that exists in Llama, keys that do not
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    with pytest.raises(tilpass.AdapterFileError, match="another base model"):
        tilpass.AdaptedModel.from_pretrained(tiny_llama(), tmp_path)


def test_atomic_write_leaves_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "adapter_model.safetensors"
    target.write_bytes(b"old")

    def boom(*_: object, **__: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("tilpass.adapter_files.save_file", boom)
    model = tilpass.get_peft_model(tiny_llama(), lora())
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_model.safetensors"]
    atomic_write_bytes(tmp_path / "x.txt", b"abc")
    assert file_sha256(tmp_path / "x.txt") == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )


def test_written_files_follow_the_umask(tmp_path: Path) -> None:
    """Saved files get the mode a plain open() gives them (0644 under umask 022), not 0600."""
    import os
    import stat

    from tilpass.adapter_files import save_tensors

    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "a.json", b"{}")
        save_tensors(tmp_path / "b.safetensors", {"x": torch.zeros(2)}, metadata={})
    finally:
        os.umask(old)
    for name in ("a.json", "b.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name
