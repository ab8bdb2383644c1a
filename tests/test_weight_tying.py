"""`ensure_weight_tying`: one adapter shared by an input embedding and the layers tied to it.

The models mirror a tied causal LM (`lm_head.weight` is `embed_tokens.weight`) and an
encoder-decoder whose stacks and head share one embedding. Numbers are compared with PEFT's on
the same files (adapters initialised non-zero), and with a float64 formula.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

import tilpass
from tilpass.methods.lora import LoraEmbedding, LoraLinear
from tilpass.saved_modules import ModulesToSave
from tilpass.weight_tying import tied_module_names

os.environ.setdefault("HF_HUB_OFFLINE", "1")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:adapter .* MiB:UserWarning")

VOCAB, DIM = 24, 8


class _Config:
    def __init__(self, tie: bool) -> None:
        self.tie_word_embeddings = tie

    def to_dict(self) -> dict[str, Any]:
        return {"tie_word_embeddings": self.tie_word_embeddings}


class Body(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, DIM)
        self.linear = nn.Linear(DIM, DIM, bias=False)


class TiedLM(nn.Module):
    """A causal LM whose output head is its input embedding (list-form `_tied_weights_keys`)."""

    _tied_weights_keys: ClassVar[list[str]] = ["lm_head.weight"]

    def __init__(self, tie: bool = True) -> None:
        super().__init__()
        self.model = Body()
        self.config = _Config(tie)
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)
        self.lm_head.weight = self.model.embed_tokens.weight

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(torch.relu(self.model.linear(self.model.embed_tokens(ids))))


class Stacks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Embedding(VOCAB, DIM)
        self.encoder = Body()
        self.decoder = Body()


class TiedSeq2Seq(nn.Module):
    """Encoder and decoder embeddings and the head all tied to `model.shared` (mapping form)."""

    _tied_weights_keys: ClassVar[dict[str, str]] = {
        "model.encoder.embed_tokens.weight": "model.shared.weight",
        "model.decoder.embed_tokens.weight": "model.shared.weight",
        "lm_head.weight": "model.shared.weight",
    }

    def __init__(self) -> None:
        super().__init__()
        self.model = Stacks()
        self.config = _Config(True)
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)
        for module in (self.model.encoder.embed_tokens, self.model.decoder.embed_tokens):
            module.weight = self.model.shared.weight
        self.lm_head.weight = self.model.shared.weight

    def get_input_embeddings(self) -> nn.Module:
        return self.model.shared

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        enc = self.model.encoder.linear(self.model.encoder.embed_tokens(ids))
        dec = self.model.decoder.linear(self.model.decoder.embed_tokens(ids))
        return self.lm_head(torch.relu(enc + dec))


def tied_lm(seed: int = 0, tie: bool = True) -> TiedLM:
    torch.manual_seed(seed)
    return TiedLM(tie).eval()


IDS = torch.tensor([[1, 5, 7, 2], [3, 3, 9, 0]])


def config(**kw: Any) -> tilpass.LoraConfig:
    return tilpass.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **kw)


def test_tied_names_follow_the_model_and_its_config() -> None:
    assert tied_module_names(tied_lm()) == ["lm_head"]
    assert tied_module_names(tied_lm(tie=False)) == []  # the checkpoint turns tying off
    assert tied_module_names(TiedSeq2Seq()) == [
        "lm_head",
        "model.decoder.embed_tokens",
        "model.encoder.embed_tokens",
    ]


def test_targets_share_the_embedding_adapter_and_match_a_float64_formula() -> None:
    model = tilpass.get_peft_model(
        tied_lm(), config(target_modules=["linear", "lm_head"], ensure_weight_tying=True)
    )
    base = model.get_base_model()
    embed, head = base.model.embed_tokens, base.lm_head
    assert isinstance(embed, LoraEmbedding) and isinstance(head, LoraLinear)
    a_e, b_e = embed.lora_embedding_A["default"], embed.lora_embedding_B["default"]
    assert head.lora_A["default"].data_ptr() == b_e.data_ptr()
    assert head.lora_B["default"].data_ptr() == a_e.data_ptr()
    assert model.peft_config["default"].target_modules == ["linear", "model.embed_tokens"]
    # One update for both layers: the head's weight delta is the embedding's.
    torch.testing.assert_close(head.delta_weight("default"), embed.delta_weight("default"))
    # float64: logits = relu((E + dE)[ids] W_lin'^T) (E + dE)^T with dE = s A_e^T B_e^T.
    d = {k: v.detach().double() for k, v in base.state_dict().items()}
    s = 8 / 4
    table = d["model.embed_tokens.weight"] + s * a_e.detach().double().T @ b_e.detach().double().T
    lin = base.model.linear
    w_lin = d["model.linear.weight"] + s * (
        lin.lora_B["default"].detach().double() @ lin.lora_A["default"].detach().double()
    )
    expected = torch.relu(table[IDS] @ w_lin.T) @ table.T
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).double(), expected, rtol=1e-5, atol=1e-5)


def test_a_training_step_keeps_the_tie() -> None:
    model = tilpass.get_peft_model(
        tied_lm(), config(target_modules=["lm_head"], ensure_weight_tying=True)
    )
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(IDS).square().mean().backward()
    optimizer.step()
    base = model.get_base_model()
    embed, head = base.model.embed_tokens, base.lm_head
    torch.testing.assert_close(head.delta_weight("default"), embed.delta_weight("default"))


@pytest.mark.parametrize("direction", ["peft_to_tilpass", "tilpass_to_peft"])
def test_tied_adapter_files_move_between_peft_and_tilpass(tmp_path: Path, direction: str) -> None:
    settings = {"target_modules": ["linear", "lm_head"], "ensure_weight_tying": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if direction == "peft_to_tilpass":
            torch.manual_seed(1)
            source = peft.get_peft_model(
                tied_lm(), peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **settings)
            )
            source.save_pretrained(tmp_path)
            target = tilpass.PeftModel.from_pretrained(tied_lm(), tmp_path)
        else:
            source = tilpass.get_peft_model(tied_lm(), config(**settings))
            source.save_pretrained(tmp_path)
            target = peft.PeftModel.from_pretrained(tied_lm(), tmp_path)
    with torch.no_grad():
        expected, got = source.eval()(IDS), target.eval()(IDS)
        torch.testing.assert_close(got, expected)
        assert (got - tied_lm()(IDS)).abs().max() > 1e-3  # the adapter changes the output


def test_modules_to_save_copies_share_one_weight(tmp_path: Path) -> None:
    model = tilpass.get_peft_model(
        tied_lm(),
        config(target_modules=["linear"], modules_to_save=["lm_head"], ensure_weight_tying=True),
    )
    base = model.get_base_model()
    embed, head = base.model.embed_tokens, base.lm_head
    assert isinstance(embed, ModulesToSave) and isinstance(head, ModulesToSave)
    assert head.modules_to_save["default"].weight is embed.modules_to_save["default"].weight
    assert model.peft_config["default"].modules_to_save == ["model.embed_tokens"]
    with torch.no_grad():
        embed.modules_to_save["default"].weight.add_(1.0)
        expected = model(IDS)
    model.save_pretrained(tmp_path)
    loaded = tilpass.PeftModel.from_pretrained(tied_lm(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS), expected)


def test_encoder_decoder_embeddings_and_head_share_the_adapter() -> None:
    model = tilpass.get_peft_model(
        TiedSeq2Seq(), config(target_modules=["linear", "embed_tokens"], ensure_weight_tying=True)
    )
    stacks, head = model.get_base_model().model, model.get_base_model().lm_head
    shared = stacks.shared
    for embedding in (stacks.encoder.embed_tokens, stacks.decoder.embed_tokens):
        assert isinstance(embedding, LoraEmbedding)
        assert embedding.lora_embedding_A["default"] is shared.lora_embedding_A["default"]
    assert head.lora_A["default"].data_ptr() == shared.lora_embedding_B["default"].data_ptr()
    torch.testing.assert_close(head.delta_weight("default"), shared.delta_weight("default"))


def test_merging_a_tied_adapter_keeps_the_outputs() -> None:
    model = tilpass.get_peft_model(
        tied_lm(), config(target_modules=["linear", "lm_head"], ensure_weight_tying=True)
    )
    with torch.no_grad():
        unmerged = model(IDS)
    with pytest.warns(UserWarning, match="merging untied"):
        merged = model.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS), unmerged, rtol=1e-5, atol=1e-4)  # rounding


@pytest.mark.parametrize(
    ("model_fn", "settings", "message"),
    [
        (tied_lm, {"target_modules": ["lm_head"]}, "`ensure_weight_tying` is not set to True"),
        (
            tied_lm,
            {"modules_to_save": ["embed_tokens"], "target_modules": ["linear"]},
            "`ensure_weight_tying` is not set to True",
        ),
        (
            lambda: tied_lm(tie=False),
            {"target_modules": ["lm_head"], "ensure_weight_tying": True},
            "no tied modules were found in the model",
        ),
        (
            tied_lm,
            {"target_modules": ["linear"], "ensure_weight_tying": True},
            "no tied modules are added",
        ),
    ],
)
def test_warnings_match_peft(model_fn: Any, settings: dict, message: str) -> None:
    for library in (tilpass, peft):
        with pytest.warns(UserWarning, match=message):
            library.get_peft_model(model_fn(), library.LoraConfig(**settings))


def test_untied_config_keeps_separate_adapters() -> None:
    model = tilpass.get_peft_model(
        tied_lm(tie=False),
        config(target_modules=["embed_tokens", "lm_head"], ensure_weight_tying=False),
    )
    base = model.get_base_model()
    head_a = base.lm_head.lora_A["default"]
    assert head_a.data_ptr() != base.model.embed_tokens.lora_embedding_B["default"].data_ptr()


def test_upcast_half_precision_adapters_stay_tied() -> None:
    model = tilpass.get_peft_model(
        tied_lm().to(torch.bfloat16),
        config(target_modules=["lm_head"], ensure_weight_tying=True),
    )
    base = model.get_base_model()
    embed, head = base.model.embed_tokens, base.lm_head
    b_e = embed.lora_embedding_B["default"]
    assert b_e.dtype == head.lora_A["default"].dtype == torch.float32
    assert head.lora_A["default"].data_ptr() == b_e.data_ptr()
    torch.testing.assert_close(head.lora_A["default"], b_e.T)


def test_peft_s_tied_modules_to_save_file_loads(tmp_path: Path) -> None:
    torch.manual_seed(1)
    settings = {"target_modules": ["linear"], "modules_to_save": ["lm_head"]}
    theirs = peft.get_peft_model(
        tied_lm(),
        peft.LoraConfig(r=4, init_lora_weights=False, ensure_weight_tying=True, **settings),
    )
    with torch.no_grad():
        theirs.base_model.model.model.embed_tokens.modules_to_save["default"].weight.add_(0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(tmp_path)
    ours = tilpass.PeftModel.from_pretrained(tied_lm(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), theirs.eval()(IDS))


def test_a_second_adapter_is_tied_to_its_own_embedding_factors() -> None:
    settings = {"target_modules": ["lm_head"], "ensure_weight_tying": True}
    model = tilpass.get_peft_model(tied_lm(), config(**settings))
    model.add_adapter("two", config(**settings))
    base = model.get_base_model()
    embed, head = base.model.embed_tokens, base.lm_head
    for name in ("default", "two"):
        assert head.lora_A[name].data_ptr() == embed.lora_embedding_B[name].data_ptr()
    model.set_adapter("two")
    with torch.no_grad():
        two = model(IDS)
    model.delete_adapter("default")
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), two)
