"""PiSSA / OLoRA adapters: loading recomputes the residual base weight (as PEFT does), and
`save_pretrained(path_initial_model_for_weight_conversion=...)` writes the equivalent plain
LoRA adapter of rank 2r, compared with a float64 formula and with PEFT's own conversion."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import tilpass
from tests.parity import outputs, peft_both_ways, perturb

TOL = {"atol": 1e-5, "rtol": 1e-5}
WEIGHTS = "adapter_model.safetensors"


class Net(nn.Module):
    """Two linear layers, the first adapted."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin0 = nn.Linear(12, 10)
        self.lin1 = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(x)))


def sample() -> torch.Tensor:
    return torch.randn(5, 12, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_saved_pissa_or_olora_adapter_loads_onto_the_original_base_as_in_peft(
    init: str, tmp_path: Path
) -> None:
    """The file holds A and B only; the trained model is residual + s B A, so loading must
    recompute the residual (PEFT does; without it the base weight would stay whole)."""
    settings = {"r": 4, "lora_alpha": 8, "target_modules": ["lin0"], "init_lora_weights": init}
    peft_both_ways(Net, settings, sample(), tmp_path)


def trained(init: str, **settings: object) -> tilpass.AdaptedModel:
    config = tilpass.LoraConfig(target_modules=["lin0"], init_lora_weights=init, **settings)
    return tilpass.get_peft_model(Net(), config).eval()


@pytest.mark.parametrize(
    ("init", "settings"),
    [("pissa", {"r": 4, "alpha_pattern": {"lin0": 5}}), ("olora", {"r": 2, "use_rslora": True})],
)
def test_conversion_gives_plain_lora_with_the_trained_change(
    init: str, settings: dict, tmp_path: Path
) -> None:
    model = trained(init, **settings)
    model.save_pretrained(tmp_path / "init")
    start = load_file(tmp_path / "init" / WEIGHTS)
    perturb(model.adapter_parameters("default"), seed=5)
    before = copy.deepcopy(model.peft_config["default"].to_dict())
    model.save_pretrained(
        tmp_path / "converted", path_initial_model_for_weight_conversion=tmp_path / "init"
    )
    assert model.peft_config["default"].to_dict() == before  # the model's config is kept
    saved = json.loads((tmp_path / "converted" / "adapter_config.json").read_text())
    r = settings["r"]
    assert (saved["r"], saved["init_lora_weights"]) == (2 * r, True)
    rslora = settings.get("use_rslora", False)
    alpha = settings.get("alpha_pattern", {}).get("lin0", 8)
    scale = alpha / (r**0.5 if rslora else r)
    new_alpha = saved["alpha_pattern"].get("lin0", saved["lora_alpha"])
    assert new_alpha / ((2 * r) ** 0.5 if rslora else 2 * r) == pytest.approx(scale)
    # float64: s' B' A' equals s (B A - B0 A0)
    now = {k: v.double() for k, v in model.adapter_state_dict("default").items()}
    got = {k: v.double() for k, v in load_file(tmp_path / "converted" / WEIGHTS).items()}
    key_a, key_b = "base_model.model.lin0.lora_A.weight", "base_model.model.lin0.lora_B.weight"
    expected = scale * (now[key_b] @ now[key_a] - start[key_b].double() @ start[key_a].double())
    torch.testing.assert_close(scale * got[key_b] @ got[key_a], expected, atol=1e-10, rtol=1e-10)
    # loaded onto the original base model, it gives the trained outputs
    loaded = tilpass.AdaptedModel.from_pretrained(Net(), tmp_path / "converted")
    torch.testing.assert_close(outputs(loaded, sample()), outputs(model, sample()), **TOL)
    assert not torch.allclose(outputs(loaded, sample()), outputs(Net(), sample()))
    assert torch.equal(loaded.base_model.lin0.weight, Net().lin0.weight)  # base untouched
    initial = json.loads((tmp_path / "init" / "adapter_config.json").read_text())
    assert initial["init_lora_weights"] is True  # as PEFT: the initial adapter is plain now


def test_conversion_equals_peft_s(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    settings = {"r": 4, "lora_alpha": 8, "target_modules": ["lin0"], "init_lora_weights": "pissa"}
    theirs = peft.get_peft_model(Net(), peft.LoraConfig(**settings)).eval()
    theirs.save_pretrained(tmp_path / "peft-init")
    perturb([p for p in theirs.parameters() if p.requires_grad], seed=7)
    theirs.save_pretrained(
        tmp_path / "peft", path_initial_model_for_weight_conversion=tmp_path / "peft-init"
    )
    ours = tilpass.get_peft_model(Net(), tilpass.LoraConfig(**settings)).eval()
    ours.save_pretrained(tmp_path / "ours-init")
    tilpass.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    ours.save_pretrained(
        tmp_path / "ours", path_initial_model_for_weight_conversion=tmp_path / "ours-init"
    )
    expected, got = load_file(tmp_path / "peft" / WEIGHTS), load_file(tmp_path / "ours" / WEIGHTS)
    assert set(got) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, **TOL)
    config = {}
    for who in ("peft", "ours"):
        data = json.loads((tmp_path / who / "adapter_config.json").read_text())
        config[who] = {k: data[k] for k in ("r", "lora_alpha", "init_lora_weights")}
    assert config["ours"] == config["peft"]
    loaded = peft.PeftModel.from_pretrained(Net(), tmp_path / "ours").eval()
    torch.testing.assert_close(outputs(loaded, sample()), outputs(theirs, sample()), **TOL)


def test_conversion_refusals_say_why(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="Rank-Stabilized LoRA with rank_pattern"):
        model = trained("pissa", r=4, use_rslora=True, rank_pattern={"lin0": 2})
    model.save_pretrained(tmp_path / "init")
    with pytest.raises(ValueError, match="Passing `path_initial_model_for_weight_conversion`"):
        model.save_pretrained(tmp_path / "x", path_initial_model_for_weight_conversion=tmp_path)
    plain = trained("olora", r=4)
    with pytest.raises(tilpass.AdapterFileError, match="saved right after get_peft_model"):
        plain.save_pretrained(tmp_path / "y", path_initial_model_for_weight_conversion=tmp_path)
    assert not (tmp_path / "y" / WEIGHTS).exists()  # nothing half-written


@pytest.mark.parametrize(("init", "name"), [("pissa_niter_2", "PiSSA"), ("OLoRA", "OLoRA")])
def test_an_adapter_that_changed_the_base_warns_beside_others(init: str, name: str) -> None:
    model = trained(init, r=4)
    other = tilpass.LoraConfig(target_modules=["lin1"], r=4)
    with pytest.warns(UserWarning, match=f"{name} changes the base weights of the model"):
        model.add_adapter("other", other)


def test_a_server_refuses_an_adapter_that_changes_the_shared_base(tmp_path: Path) -> None:
    from tilpass.serve.adapters import AdapterCache, AdapterError

    trained("pissa", r=4).save_pretrained(tmp_path / "pissa")
    trained(True, r=4).save_pretrained(tmp_path / "plain")
    model = tilpass.AdaptedModel(Net()).eval()
    cache = AdapterCache(model, tmp_path, max_count=4, max_bytes=1 << 20)
    with pytest.raises(AdapterError, match="changes the base weights that every served adapter"):
        cache.ensure("pissa", busy=set())
    assert torch.equal(model.base_model.lin0.weight, Net().lin0.weight)
    cache.ensure("plain", busy=set())
    assert list(model.peft_config) == ["plain"]
