"""LoRA fields beyond the basics: lora_bias, DoRA on nn.Embedding, PiSSA / OLoRA / orthogonal
initialisation, PEFT's research variants (refused), and the mixed-batch behaviour PEFT's own
tests check (rows equal single-adapter runs within torch.allclose defaults, modules_to_save
called by keyword or returning a tuple)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import tilpass
from tests.helpers import tiny_llama, tokens
from tests.parity import peft_both_ways, perturb
from tests.reference import lora_ref
from tilpass.errors import AdapterFileError
from tilpass.methods.lora import AdapterSpec, LoraEmbedding, LoraLinear
from tilpass.methods.lora.dora import DORA
from tilpass.methods.lora.unsupported import UnsupportedVariantError

TOL64 = {"atol": 1e-10, "rtol": 1e-10}


# -- lora_bias -------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
def test_lora_bias_on_linear_matches_the_reference(bias: bool) -> None:
    torch.manual_seed(0)
    base = nn.Linear(12, 10, bias=bias, dtype=torch.float64)
    layer = LoraLinear(base)
    layer.add_adapter("a", 0, AdapterSpec(r=4, alpha=8, init=False, lora_bias=True))
    perturb(layer.adapter_parameters("a"), seed=1)
    layer.active = ["a"]
    t = layer.adapter_tensors("a")
    assert set(t) == {"lora_A.weight", "lora_B.weight", "lora_B.bias"}
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    shift = layer.specs["a"].scale * t["lora_B.bias"]
    full_bias = shift if base.bias is None else base.bias + shift
    expected = lora_ref.linear(
        x, base.weight, full_bias, t["lora_A.weight"], t["lora_B.weight"], 2.0
    )
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            torch.testing.assert_close(layer(x), expected, **TOL64)
    if not bias:
        with pytest.raises(RuntimeError, match="has no bias"):
            layer.merge()
        return
    original = base.bias.detach().clone()
    layer.merge()
    torch.testing.assert_close(base(x), expected, **TOL64)
    layer.unmerge()
    torch.testing.assert_close(base.bias, original, **TOL64)


def test_lora_bias_refuses_dora_other_inits_and_embeddings() -> None:
    with pytest.raises(ValueError, match="use_dora"):
        tilpass.LoraConfig(target_modules=["q_proj"], lora_bias=True, use_dora=True)
    with pytest.raises(ValueError, match="init_lora_weights"):
        tilpass.LoraConfig(target_modules=["q_proj"], lora_bias=True, init_lora_weights="gaussian")
    config = tilpass.LoraConfig(target_modules=["embed_tokens"], lora_bias=True)
    with pytest.raises(ValueError, match="not supported for Embedding"):
        tilpass.get_peft_model(tiny_llama(), config)


def llama_with_bias(seed: int = 0) -> nn.Module:
    """The tiny Llama with biases on its attention projections (so lora_bias can merge)."""
    model = tiny_llama(seed)
    torch.manual_seed(seed + 1)
    for layer in model.model.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.v_proj):
            proj.bias = nn.Parameter(torch.randn(proj.out_features) * 0.1)
    return model


def test_lora_bias_peft_parity_both_ways(tmp_path: Path) -> None:
    pytest.importorskip("peft")
    settings = {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj"],
        "lora_bias": True,
        "init_lora_weights": False,
    }
    peft_both_ways(llama_with_bias, settings, tokens(), tmp_path)


# -- DoRA on nn.Embedding --------------------------------------------------------------------
def test_dora_on_embedding_matches_the_reference_and_merges() -> None:
    torch.manual_seed(0)
    base = nn.Embedding(30, 8, dtype=torch.float64)
    layer = LoraEmbedding(base)
    layer.add_adapter("a", 0, AdapterSpec(r=4, alpha=8, init=False, variant=DORA))
    perturb(layer.adapter_parameters("a"), seed=2)
    layer.active = ["a"]
    t = layer.adapter_tensors("a")
    assert t["lora_magnitude_vector"].shape == (8,)  # one per embedding dimension, as PEFT
    ids = torch.randint(0, 30, (3, 7))
    a, b, m = t["lora_embedding_A"], t["lora_embedding_B"], t["lora_magnitude_vector"]
    expected = lora_ref.dora_embedding(ids, base.weight, a, b, 2.0, m)
    torch.testing.assert_close(layer(ids), expected, **TOL64)
    layer.merge()
    torch.testing.assert_close(base(ids), expected, **TOL64)
    layer.unmerge()
    torch.testing.assert_close(layer(ids), expected, **TOL64)


def test_dora_embedding_peft_parity_both_ways(tmp_path: Path) -> None:
    pytest.importorskip("peft")
    settings = {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["embed_tokens", "q_proj"],
        "use_dora": True,
        "init_lora_weights": False,
    }
    peft_both_ways(tiny_llama, settings, tokens(), tmp_path)


# -- initialisations that read the base weight ---------------------------------------------
@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora"])
def test_weight_inits_leave_the_layer_output_unchanged(init: str) -> None:
    torch.manual_seed(0)
    base = nn.Linear(12, 10, dtype=torch.float64)
    original = base.weight.detach().clone()
    x = torch.randn(4, 12, dtype=torch.float64)
    before = base(x)
    layer = LoraLinear(base)
    layer.add_adapter("a", 0, AdapterSpec(r=4, alpha=8, init=init))
    layer.active = ["a"]
    t = layer.adapter_tensors("a")
    delta = 2.0 * t["lora_B.weight"] @ t["lora_A.weight"]
    assert bool(t["lora_A.weight"].any()) and bool(t["lora_B.weight"].any())
    torch.testing.assert_close(base.weight + delta, original, **TOL64)  # the residual + s B A
    torch.testing.assert_close(layer(x), before, **TOL64)
    if init == "pissa":  # s B A is W's best rank-4 approximation
        u, s, vh = torch.linalg.svd(original)
        torch.testing.assert_close(delta, (u[:, :4] * s[:4]) @ vh[:4], **TOL64)


def test_orthogonal_init_gives_a_zero_update_from_non_zero_factors() -> None:
    layer = LoraLinear(nn.Linear(12, 10, dtype=torch.float64))
    layer.add_adapter("a", 0, AdapterSpec(r=4, alpha=8, init="orthogonal"))
    t = layer.adapter_tensors("a")
    assert t["lora_A.weight"].abs().min() > 0 and t["lora_B.weight"].abs().min() > 0
    product = t["lora_B.weight"] @ t["lora_A.weight"]
    torch.testing.assert_close(product, torch.zeros_like(product), atol=1e-7, rtol=0)
    with pytest.raises(ValueError, match="LoRA rank to be even, got 3"):
        layer.add_adapter("b", 1, AdapterSpec(r=3, alpha=8, init="orthogonal"))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_weight_inits_equal_peft(init: str) -> None:
    peft = pytest.importorskip("peft")
    settings = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(init_lora_weights=init, **settings))
    ours = tilpass.get_peft_model(
        tiny_llama(), tilpass.LoraConfig(init_lora_weights=init, **settings)
    )
    expected = peft.utils.get_peft_model_state_dict(theirs)
    got = ours.adapter_state_dict("default")
    assert set(got) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, atol=1e-5, rtol=1e-5)
    residual = {k: v for k, v in theirs.base_model.model.state_dict().items() if "base_layer" in k}
    for key, value in residual.items():
        ours_key = key.replace(".base_layer", "")
        torch.testing.assert_close(
            ours.base_model.state_dict()[ours_key], value, atol=1e-5, rtol=1e-5
        )


# -- research variants ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field",
    [
        {"use_bdlora": {"block_size": 4}},
        {"velora_config": {"rank": 2}},
        {"kasa_config": {"k": 1}},
        {"monteclora_config": {"n": 2}},
        {"init_lora_weights": "eva"},
        {"init_lora_weights": "corda"},
        {"init_lora_weights": "lora_ga"},
        {"init_lora_weights": "mica"},
    ],
)
def test_research_variants_raise_one_clear_error(field: dict) -> None:
    with pytest.raises(UnsupportedVariantError, match="not supported by tilpass; supported are"):
        tilpass.LoraConfig(target_modules=["q_proj"], **field)


def test_a_peft_file_with_a_research_variant_is_refused_naming_the_file(tmp_path: Path) -> None:
    tilpass.get_peft_model(
        tiny_llama(), tilpass.LoraConfig(target_modules=["q_proj"])
    ).save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "velora_config": {"rank": 2}}))
    with pytest.raises(AdapterFileError, match=r"adapter_config\.json.*VeLoRA"):
        tilpass.AdaptedModel.from_pretrained(tiny_llama(), tmp_path)


# -- mixed batches, as PEFT's own tests check them ------------------------------------------
class MLP(nn.Module):
    """PEFT's test MLP: inputs up to 89 make large pre-activations, where any difference in
    rounding shows after the log-softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.lin1 = nn.Linear(20, 2)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.lin1(torch.relu(self.lin0(X.float()))), dim=-1)


def mixed_and_single(model: tilpass.AdaptedModel, x: torch.Tensor) -> None:
    """Rows base / first / second adapter, round robin: each equals its own run (allclose)."""
    names = ["__base__", *model.peft_config]
    with model.disable_adapter():
        expected = {"__base__": model(X=x)}
    for name in names[1:]:
        model.set_adapter(name)
        expected[name] = model(X=x)
    rows = [names[i % 3] for i in range(len(x))]
    mixed = model(X=x, adapter_names=rows)
    for i, name in enumerate(rows):
        assert torch.allclose(mixed[i], expected[name][i]), (i, name, mixed[i] - expected[name][i])


@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("second", [{"r": 16}, {"r": 8, "target_modules": ["lin0", "lin1"]}])
def test_mixed_rows_equal_single_runs_within_allclose_defaults(grad: bool, second: dict) -> None:
    torch.manual_seed(0)
    first = tilpass.LoraConfig(target_modules=["lin0"], init_lora_weights=False)
    model = tilpass.get_peft_model(MLP().eval(), first, "adapter0").eval()
    model.add_adapter(
        "adapter1",
        tilpass.LoraConfig(**{"target_modules": ["lin0"], **second, "init_lora_weights": False}),
    )
    with torch.set_grad_enabled(grad):
        mixed_and_single(model, torch.arange(90).view(-1, 10))


class KeywordHead(nn.Module):
    """Calls its modules_to_save module by keyword only, and runs a GRU."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.gru = nn.GRU(20, 20, batch_first=True)
        self.head = nn.Linear(20, 2)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        h, _ = self.gru(torch.relu(self.lin0(X.float())).unsqueeze(1))
        return self.head(input=h.squeeze(1))


def test_modules_to_save_called_by_keyword_works_in_plain_and_mixed_batches() -> None:
    torch.manual_seed(0)
    config = tilpass.LoraConfig(
        target_modules=["lin0"], modules_to_save=["head"], init_lora_weights=False
    )
    model = tilpass.get_peft_model(KeywordHead().eval(), config, "adapter0").eval()
    model.add_adapter("adapter1", config)
    for name in ("adapter0", "adapter1"):
        perturb(model.adapter_parameters(name), seed=len(name))
    mixed_and_single(model, torch.arange(90).view(-1, 10))


def test_mixed_batch_through_a_gru_in_modules_to_save_raises_peft_type_error() -> None:
    torch.manual_seed(0)
    config = tilpass.LoraConfig(
        target_modules=["lin0"], modules_to_save=["gru"], init_lora_weights=False
    )
    model = tilpass.get_peft_model(KeywordHead().eval(), config, "adapter0").eval()
    model.add_adapter("adapter1", config)
    with pytest.raises(
        TypeError, match="Mixed batching is only supported for the following modules"
    ):
        model(
            X=torch.arange(90).view(-1, 10), adapter_names=["__base__", "adapter0", "adapter1"] * 3
        )
