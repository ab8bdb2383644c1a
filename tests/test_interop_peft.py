"""Interoperability with Hugging Face PEFT: files, logits, named adapters, mixed batches, merging.

Every case runs on a tiny random `transformers` model built from its config (Llama family and
GPT-2, whose attention and MLP are `Conv1D` layers with `fan_in_fan_out`). Every adapter tensor
is random and non-zero (`init_lora_weights=False`, then a seeded perturbation of all trainable
tensors, DoRA magnitudes and `modules_to_save` copies included), so a loader that silently
leaves `lora_B` at zero, or recomputes a magnitude instead of reading it, fails the test.
Comparisons are on whole logits tensors.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft.utils import get_peft_model_state_dict  # noqa: E402

import tilpass  # noqa: E402
from tilpass.methods.lora import LoraLayer  # noqa: E402

# Tiny models make every adapter "large"; that advice is not what these tests are about.
# PEFT's notice that it also saves the base embedding matrix is expected for embedding cases.
pytestmark = [
    pytest.mark.filterwarnings("ignore:adapter '.*' is .* MiB:UserWarning"),
    pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers` to `True`:UserWarning"),
]

TOL: dict[torch.dtype, dict[str, float]] = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.float64: {"atol": 1e-10, "rtol": 1e-10},
}
MIN_EFFECT = 1e-3  # the adapter must move the logits by more than this (max abs difference)
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


@dataclasses.dataclass(frozen=True)
class Case:
    """One row of the matrix: a base model, LoRA settings (identical field names in both
    libraries), the dtype, and whether PEFT supports `adapter_names=` for it."""

    id: str
    arch: str
    lora: dict[str, Any]
    dtype: torch.dtype = torch.float32
    mixed: bool = True
    # settings of the second adapter ("legal") in the named / mixed-batch tests
    second: dict[str, Any] | None = None

    def config(self, lib: Any, **override: Any) -> Any:
        kw = {"r": 8, "lora_alpha": 16, "init_lora_weights": False, **self.lora, **override}
        return lib.LoraConfig(**kw)

    def second_config(self, lib: Any) -> Any:
        return self.config(lib, **(self.second or {"r": 4, "lora_alpha": 12}))


CASES = [
    Case("llama-q_v", "llama", {"target_modules": ["q_proj", "v_proj"]}),
    Case(
        "llama-q_v-fp64",
        "llama",
        {"target_modules": ["q_proj", "v_proj"]},
        dtype=torch.float64,
        second={"r": 4, "lora_alpha": 12, "target_modules": ["q_proj"]},
    ),
    Case("gpt2-c_attn", "gpt2", {"target_modules": ["c_attn"]}),
    Case(
        "gpt2-conv1d-all",
        "gpt2",
        {"target_modules": ["c_attn", "c_proj", "c_fc"]},
        second={"r": 4, "lora_alpha": 12, "target_modules": ["c_fc"]},
    ),
    Case(
        "llama-rslora-patterns",
        "llama",
        {
            "target_modules": ["q_proj", "v_proj", "o_proj"],
            "use_rslora": True,
            "rank_pattern": {"v_proj": 4, r"layers\.1\.self_attn\.q_proj": 12},
            "alpha_pattern": {"q_proj": 32, "o_proj": 5},
        },
    ),
    Case(
        "llama-dora",
        "llama",
        {"target_modules": ["q_proj", "v_proj"], "use_dora": True},
        mixed=False,
    ),
    Case(
        "llama-dora-fp64",
        "llama",
        {"target_modules": ["q_proj", "v_proj"], "use_dora": True},
        dtype=torch.float64,
        mixed=False,
    ),
    Case(
        "gpt2-dora", "gpt2", {"target_modules": ["c_attn", "c_fc"], "use_dora": True}, mixed=False
    ),
    Case(
        "llama-modules_to_save",
        "llama",
        {"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"]},
    ),
    Case("llama-embedding", "llama", {"target_modules": ["embed_tokens", "q_proj"]}),
    Case("gpt2-embedding", "gpt2", {"target_modules": ["wte", "c_attn"]}),  # wte tied to lm_head
    Case("llama-all-linear", "llama", {"target_modules": "all-linear"}),
    Case("gpt2-all-linear", "gpt2", {"target_modules": "all-linear"}),
    Case("llama-dropout", "llama", {"target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.1}),
]
CASE_IDS = [c.id for c in CASES]
MIXED_CASES = [c for c in CASES if c.mixed]


# -- building blocks --------------------------------------------------------------------------
def make_base(case: Case) -> nn.Module:
    """A fresh tiny random base model; the same seed gives bit-identical weights."""
    torch.manual_seed(0)
    if case.arch == "llama":
        config = transformers.LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=128,
        )
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.GPT2Config(
            n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64,
            bos_token_id=0, eos_token_id=1,
        )  # fmt: skip
        model = transformers.GPT2LMHeadModel(config)
    return model.to(case.dtype).eval()


def input_ids(rows: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1234)
    return torch.randint(0, 128, (rows, 10), generator=gen)


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor, **kw: Any) -> torch.Tensor:
    return model(input_ids=ids, **kw).logits


@torch.no_grad()
def perturb(params: list[nn.Parameter], seed: int) -> None:
    """Add seeded noise to every adapter tensor (magnitudes and saved-module copies too)."""
    gen = torch.Generator().manual_seed(seed)
    assert params, "no adapter parameters to perturb"
    for p in params:
        p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def peft_trainable(model: nn.Module, adapter: str = "default") -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if f".{adapter}." in f"{n}." and p.requires_grad]


def make_peft(case: Case, seed: int = 1) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out notice for Conv1D
        model = peft.get_peft_model(make_base(case), case.config(peft))
    perturb(peft_trainable(model), seed)
    return model.eval()


def make_tilpass(case: Case, seed: int = 1, second: bool = False) -> tilpass.AdaptedModel:
    model = tilpass.get_peft_model(make_base(case), case.config(tilpass))
    perturb(model.adapter_parameters("default"), seed)
    if second:
        model.add_adapter("legal", case.second_config(tilpass))
        model.set_requires_grad("legal", True)
        perturb(model.adapter_parameters("legal"), seed + 1)
    return model.eval()


def peft_save(model: Any, directory: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "save_embedding_layers set to True" notice
        model.save_pretrained(directory)


def peft_load(case: Case, directory: Path) -> Any:
    """`PeftModel.from_pretrained` on a fresh base; any missing-key warning fails the test."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(make_base(case), directory)
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "missing" in m.lower() or "unexpected" in m.lower()], (
        messages
    )
    return model.eval()


def file_keys(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / WEIGHTS)


def adapter_keys(tensors: dict[str, Any]) -> set[str]:
    """Keys without the base embedding copy both libraries add when an embedding is targeted
    (`save_embedding_layers="auto"`)."""
    return {k for k in tensors if not k.endswith(".base_layer.weight")}


def assert_moves(adapted: torch.Tensor, base: torch.Tensor) -> None:
    moved = (adapted - base).abs().max().item()
    assert moved > MIN_EFFECT, f"the adapter does not change the logits (max diff {moved:.2e})"


# -- 1. PEFT saves, tilpass loads ---------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_peft_saves_tilpass_loads(case: Case, tmp_path: Path) -> None:
    ids = input_ids()
    reference = make_peft(case)
    expected = logits(reference, ids)
    peft_save(reference, tmp_path)

    loaded = tilpass.AdaptedModel.from_pretrained(make_base(case), tmp_path).eval()
    got = logits(loaded, ids)

    assert_moves(expected, logits(make_base(case), ids))
    torch.testing.assert_close(got, expected, **TOL[case.dtype])
    # Every tensor arrived, bit for bit.
    ours = loaded.adapter_state_dict("default")
    theirs = get_peft_model_state_dict(reference)
    assert set(ours) == adapter_keys(theirs)
    for key, value in ours.items():
        assert torch.equal(value, theirs[key]), key


# -- 2. tilpass saves, PEFT loads ---------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_tilpass_saves_peft_loads(case: Case, tmp_path: Path) -> None:
    ids = input_ids()
    ours = make_tilpass(case)
    expected = logits(ours, ids)
    ours.save_pretrained(tmp_path)

    loaded = peft_load(case, tmp_path)
    assert_moves(expected, logits(make_base(case), ids))
    torch.testing.assert_close(logits(loaded, ids), expected, **TOL[case.dtype])

    # No missing / unexpected keys: PEFT's own view of the loaded adapter is the file.
    saved = file_keys(tmp_path)
    state = get_peft_model_state_dict(loaded)
    assert adapter_keys(saved) == adapter_keys(state)
    for key, value in saved.items():
        assert torch.equal(state[key], value), f"{key} did not load into PEFT"
    # And PEFT's load result, asked directly.
    result = loaded.load_adapter(tmp_path, "again")
    assert result.unexpected_keys == []
    assert result.missing_keys == []


# -- 3. the files themselves --------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_files_have_the_same_keys_and_shapes(case: Case, tmp_path: Path) -> None:
    peft_dir, ours_dir = tmp_path / "peft", tmp_path / "tilpass"
    peft_save(make_peft(case), peft_dir)
    make_tilpass(case).save_pretrained(ours_dir)
    theirs, ours = file_keys(peft_dir), file_keys(ours_dir)

    assert set(ours) == set(theirs)  # the base embedding copy too, as PEFT writes it
    for key, value in ours.items():
        assert tuple(value.shape) == tuple(theirs[key].shape), key
        assert value.dtype == theirs[key].dtype, key
    for key in ours:  # lora_A (r, in), lora_B (out, r): the ranks agree
        if key.endswith("lora_A.weight"):
            b_key = key.replace("lora_A.weight", "lora_B.weight")
            assert ours[key].shape[0] == ours[b_key].shape[1], key
    if case.lora.get("rank_pattern"):
        ranks = {k: v.shape[0] for k, v in ours.items() if k.endswith("lora_A.weight")}
        assert ranks["base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"] == 4
        assert ranks["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"] == 12
        assert ranks["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] == 8

    raw = json.loads((ours_dir / CONFIG).read_text())
    assert raw["peft_type"] == "LORA"
    config = peft.LoraConfig.from_pretrained(ours_dir)
    assert config.peft_type == peft.PeftType.LORA
    reference = case.config(peft)
    for field in ("r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "bias"):
        assert getattr(config, field) == getattr(reference, field), field
    for field in ("rank_pattern", "alpha_pattern"):
        assert dict(getattr(config, field)) == dict(getattr(reference, field)), field
    wanted = reference.target_modules
    assert (config.target_modules if isinstance(wanted, str) else set(config.target_modules)) == (
        wanted if isinstance(wanted, str) else set(wanted)
    )
    assert (config.modules_to_save or None) == (reference.modules_to_save or None)
    assert config.fan_in_fan_out == (case.arch == "gpt2")


# -- 4. named, non-default adapters -------------------------------------------------------------
NAMED_CASES = [c for c in CASES if c.id in ("llama-q_v", "gpt2-conv1d-all", "llama-dora")]


@pytest.mark.parametrize("case", NAMED_CASES, ids=[c.id for c in NAMED_CASES])
def test_named_adapters_load_in_peft(case: Case, tmp_path: Path) -> None:
    ids = input_ids()
    ours = make_tilpass(case, second=True)
    ours.save_pretrained(tmp_path)
    for sub in (tmp_path, tmp_path / "legal"):
        assert (sub / WEIGHTS).is_file() and (sub / CONFIG).is_file(), sub
    assert not (tmp_path / "default").exists()

    # PEFT writes the same layout for the same two adapters.
    theirs = make_peft(case)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.add_adapter("legal", case.second_config(peft))
    peft_save(theirs, tmp_path / "peft")
    for sub in ("", "legal"):
        assert set(file_keys(tmp_path / "peft" / sub)) == set(file_keys(tmp_path / sub)), sub

    loaded = peft_load(case, tmp_path)
    result = loaded.load_adapter(tmp_path / "legal", "legal")
    assert result.missing_keys == [] and result.unexpected_keys == []
    for name in ("default", "legal"):
        ours.set_adapter(name)
        loaded.set_adapter(name)
        expected = logits(ours, ids)
        torch.testing.assert_close(logits(loaded, ids), expected, **TOL[case.dtype])
    assert_moves(_logits_for(ours, "legal", ids), _logits_for(ours, "default", ids))


def _logits_for(model: tilpass.AdaptedModel, name: str, ids: torch.Tensor) -> torch.Tensor:
    previous = model.active_adapters
    model.set_adapter(name)
    try:
        return logits(model, ids)
    finally:
        model.set_adapter(previous)


# -- 5. mixed batches ---------------------------------------------------------------------------
ROUTES = ["legal", "__base__", "default", "legal"]  # uneven groups and a base row


@pytest.mark.parametrize("case", MIXED_CASES, ids=[c.id for c in MIXED_CASES])
def test_mixed_batch_matches_peft(case: Case, tmp_path: Path) -> None:
    ids = input_ids(len(ROUTES))
    ours = make_tilpass(case, second=True)
    ours.save_pretrained(tmp_path)
    theirs = peft_load(case, tmp_path)
    theirs.load_adapter(tmp_path / "legal", "legal")
    theirs.eval()

    expected = logits(theirs, ids, adapter_names=list(ROUTES))
    got = logits(ours, ids, adapter_names=list(ROUTES))
    torch.testing.assert_close(got, expected, **TOL[case.dtype])

    base = logits(make_base(case), ids)
    torch.testing.assert_close(got[1], base[1], **TOL[case.dtype])
    for row, name in enumerate(ROUTES):
        if name != "__base__":
            assert_moves(got[row], base[row])
            single = _logits_for(ours, name, ids[row : row + 1])
            torch.testing.assert_close(got[row : row + 1], single, **TOL[case.dtype])


# -- 6. merging ---------------------------------------------------------------------------------
# GPT-2's wte is lm_head's weight (tied). PEFT merges into the shared tensor, so its merged
# lm_head changes too and its merged logits differ from its unmerged ones. tilpass merges into
# a private copy: every other tensor equals PEFT's, lm_head keeps the base weight, and merged
# logits equal the unmerged model's.
TIED = {"gpt2-embedding": "lm_head.weight"}


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_merge_and_unload_matches_peft(case: Case, tmp_path: Path) -> None:
    ids = input_ids()
    theirs = make_peft(case)
    unmerged = logits(theirs, ids)
    peft_save(theirs, tmp_path)
    ours = tilpass.AdaptedModel.from_pretrained(make_base(case), tmp_path).eval()

    their_model = theirs.merge_and_unload()
    if case.id in TIED:
        with pytest.warns(UserWarning, match=r"merging untied transformer\.wte\.weight"):
            our_model = ours.merge_and_unload()
    else:
        our_model = ours.merge_and_unload()
    assert type(our_model) is type(their_model)
    their_state, our_state = their_model.state_dict(), our_model.state_dict()
    base_state = make_base(case).state_dict()
    assert set(our_state) == set(their_state) == set(base_state)
    for key, value in our_state.items():
        expected = base_state[key] if key == TIED.get(case.id) else their_state[key]
        torch.testing.assert_close(value, expected, **TOL[case.dtype], msg=key)
    assert not any(isinstance(m, LoraLayer) for m in our_model.modules())

    merged = logits(our_model, ids)
    torch.testing.assert_close(merged, unmerged, **TOL[case.dtype])
    assert_moves(merged, logits(make_base(case), ids))
    if case.id in TIED:
        assert our_model.config.tie_word_embeddings is False
        return
    torch.testing.assert_close(merged, logits(their_model, ids), **TOL[case.dtype])


# -- loading PEFT's files is quiet ----------------------------------------------------------------
def test_loading_a_plain_peft_file_does_not_warn(tmp_path: Path) -> None:
    case = CASES[0]
    peft_save(make_peft(case), tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tilpass.AdaptedModel.from_pretrained(make_base(case), tmp_path)
