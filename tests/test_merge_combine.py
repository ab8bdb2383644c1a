"""Weighted combinations of LoRA adapters: TIES, DARE and magnitude pruning against PEFT's own
output (the same tensors, the same torch seed for DARE's masks), and the rules' properties
checked on plain tensors against float64 formulas."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from helpers import tiny_llama, tokens
from torch import nn
from transformers import AutoModelForCausalLM

import tilpass
from tilpass import AdaptedModel
from tilpass.cli import main as cli_main
from tilpass.merge_combine import CombineRequest, combine_adapters
from tilpass.methods.lora.layers import LoraLayer
from tilpass.methods.lora.task_arithmetic import combine

os.environ.setdefault("HF_HUB_OFFLINE", "1")
peft = pytest.importorskip("peft")

pytestmark = [pytest.mark.filterwarnings("ignore:adapter '.*' is .* MiB:UserWarning")]

FIRST = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
SECOND = dict(r=4, lora_alpha=4, target_modules=["q_proj", "o_proj"], init_lora_weights=False)


def _pair() -> tuple[tilpass.AdaptedModel, nn.Module]:
    """Two random adapters "one", "two" in tilpass and the same tensors in PEFT."""
    torch.manual_seed(3)
    ours = tilpass.get_peft_model(tiny_llama(), tilpass.LoraConfig(**FIRST), adapter_name="one")
    ours.add_adapter("two", tilpass.LoraConfig(**SECOND))
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**FIRST), adapter_name="one")
    theirs.add_adapter("two", peft.LoraConfig(**SECOND))
    for name in ("one", "two"):
        state = tilpass.get_peft_model_state_dict(ours, adapter_name=name)
        assert not peft.set_peft_model_state_dict(theirs, state, adapter_name=name).unexpected_keys
    return ours, theirs


def _mix_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().clone()
        for k, v in tilpass.get_peft_model_state_dict(model, adapter_name="mix").items()
    }


@pytest.mark.parametrize(
    ("combination", "sign_method"),
    [
        ("ties", "total"),
        ("ties", "frequency"),
        ("ties_svd", "total"),
        ("dare_ties", "total"),
        ("dare_linear_svd", "total"),
        ("magnitude_prune", "total"),
    ],
)
def test_combination_matches_peft(combination: str, sign_method: str) -> None:
    ours, theirs = _pair()
    kwargs = {"density": 0.5, "majority_sign_method": sign_method}
    torch.manual_seed(11)  # DARE's masks: the same draws in the same order as PEFT's
    theirs.add_weighted_adapter(["one", "two"], [0.7, -1.3], "mix", combination, **kwargs)
    torch.manual_seed(11)
    ours.add_weighted_adapter(["one", "two"], [0.7, -1.3], "mix", combination, **kwargs)
    mine = _mix_tensors(ours)
    expected = peft.get_peft_model_state_dict(theirs, adapter_name="mix")
    assert sorted(mine) == sorted(expected)
    for key, value in expected.items():
        torch.testing.assert_close(mine[key], value, atol=1e-6, rtol=1e-6, msg=key)
    assert ours.peft_config["mix"].r == theirs.peft_config["mix"].r
    ours.set_adapter("mix")
    theirs.set_adapter("mix")
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(
            ours(input_ids=x).logits, theirs(input_ids=x).logits, atol=1e-5, rtol=1e-5
        )


def test_pruning_combinations_need_a_density() -> None:
    ours, _ = _pair()
    with pytest.raises(ValueError, match="needs density"):
        ours.add_weighted_adapter(["one", "two"], [1.0, 1.0], "mix", "ties")
    with pytest.raises(ValueError, match="majority_sign_method"):
        ours.add_weighted_adapter(
            ["one", "two"], [1.0, 1.0], "mix", "ties", density=0.5, majority_sign_method="mode"
        )
    assert "mix" not in ours.peft_config


# -- the rules on plain tensors --------------------------------------------------------------
def test_ties_trims_elects_and_averages_the_agreeing_entries() -> None:
    t1 = torch.tensor([[3.0, -1.0], [0.5, 2.0]])
    t2 = torch.tensor([[-1.0, -4.0], [0.25, -3.0]])
    weights = torch.tensor([2.0, 1.0])
    got = combine("ties", [t1, t2], weights, density=0.5)
    # trimmed: t1 -> [[3, 0], [0, 2]], t2 -> [[0, -4], [0, -3]]; sums [[3, -4], [0, -1]]
    # elected signs [[+, -], [+, -]]; agreeing weighted entries averaged
    expected = torch.tensor([[6.0, -4.0], [0.0, -3.0]])
    torch.testing.assert_close(got, expected)
    # frequency: entry (1, 1) has one + (t1) and one - (t2): a tie counts as +
    got = combine("ties", [t1, t2], weights, density=0.5, sign_method="frequency")
    torch.testing.assert_close(got, torch.tensor([[6.0, -4.0], [0.0, 4.0]]))


def test_dare_keeps_a_density_fraction_rescaled_and_is_unbiased() -> None:
    torch.manual_seed(0)
    t = torch.randn(200, 200, dtype=torch.float64)
    out = combine("dare_linear", [t], torch.tensor([1.0], dtype=torch.float64), density=0.25)
    kept = out != 0
    assert abs(kept.double().mean().item() - 0.25) < 0.01
    torch.testing.assert_close(out[kept], t[kept] / 0.25)
    draws = torch.stack(
        [combine("dare_linear", [t], torch.ones(1, dtype=torch.float64), 0.5) for _ in range(200)]
    )
    assert (draws.mean(dim=0) - t).abs().max().item() < 5 * 2 * t.abs().max().item() / 200**0.5
    torch.manual_seed(5)
    first = combine("dare_ties", [t, -t], torch.ones(2, dtype=torch.float64), 0.5)
    torch.manual_seed(5)
    again = combine("dare_ties", [t, -t], torch.ones(2, dtype=torch.float64), 0.5)
    torch.testing.assert_close(first, again, atol=0, rtol=0)


def test_magnitude_prune_keeps_the_largest_entries() -> None:
    t = torch.tensor([1.0, -5.0, 2.0, 0.5])
    got = combine("magnitude_prune", [t], torch.tensor([3.0]), density=0.5)
    torch.testing.assert_close(got, torch.tensor([0.0, -15.0, 6.0, 0.0]))


# -- `tilpass merge` with several adapters ---------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny model directory and two random LoRA adapters (r = 4, other targets) for it."""
    from tests.test_cli import save_tiny_model

    root = tmp_path_factory.mktemp("combine")
    model_dir = save_tiny_model(root / "model")
    out = {"model": model_dir}
    for name, settings, seed in (("first", FIRST, 1), ("second", SECOND, 2)):
        base = AutoModelForCausalLM.from_pretrained(model_dir)
        torch.manual_seed(seed)
        adapted = tilpass.get_peft_model(base, tilpass.LoraConfig(**settings))
        adapted.save_pretrained(root / name)
        out[name] = root / name
    return out


def _deltas(model_dir: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """Each adapted layer's weight change s B A in float64, by module name."""
    adapted = AdaptedModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter)
    out = {}
    for name, module in adapted.base_model.named_modules():
        if isinstance(module, LoraLayer):
            a, b = module.lora_a["default"].double(), module.lora_b["default"].double()
            out[name] = module.specs["default"].scale * (b @ a)
    return out


def test_linear_combination_is_the_weighted_sum_of_the_deltas(
    saved: dict[str, Path], tmp_path: Path
) -> None:
    request = CombineRequest(
        base=str(saved["model"]),
        adapters=[saved["first"], saved["second"]],
        weights=[0.7, 0.3],
        out=tmp_path / "mix",
        output="adapter",
    )
    result = combine_adapters(request)
    assert result.passed and result.check.absolute == 0.0  # the saved file reloads exactly
    first, second = (
        _deltas(saved["model"], saved["first"]),
        _deltas(saved["model"], saved["second"]),
    )
    mixed = _deltas(saved["model"], tmp_path / "mix")
    assert sorted(mixed) == sorted(set(first) | set(second))
    for name, delta in mixed.items():
        zero = torch.zeros_like(delta)
        expected = 0.7 * first.get(name, zero) + 0.3 * second.get(name, zero)
        torch.testing.assert_close(delta, expected, atol=1e-6, rtol=1e-6, msg=name)
    record = json.loads((tmp_path / "mix" / "tilpass_record.json").read_text())
    assert len(record["base_model"]["sha256"]) == 64
    parents = record["merge"]["parents"]
    assert [(Path(p["path"]), p["weight"]) for p in parents] == [
        (saved["first"], 0.7),
        (saved["second"], 0.3),
    ]
    assert "## Merged from" in (tmp_path / "mix" / "README.md").read_text()

    request.weights, request.out = [1.0, 0.0], tmp_path / "only-first"
    combine_adapters(request)
    for name, delta in _deltas(saved["model"], tmp_path / "only-first").items():
        expected = first.get(name, torch.zeros_like(delta))
        torch.testing.assert_close(delta, expected, atol=1e-6, rtol=1e-6, msg=name)


def test_cli_ties_into_a_full_model_checks_itself(saved: dict[str, Path], tmp_path: Path) -> None:
    from tests.test_cli import tilpass as run_tilpass

    out = tmp_path / "merged"
    proc = run_tilpass(
        "merge", "--base", str(saved["model"]), "--adapter", str(saved["first"]),
        "--adapter", str(saved["second"]), "--weights", "0.7,0.3", "--combination", "ties",
        "--density", "0.5", "--out", str(out), cwd=tmp_path,
    )  # fmt: skip
    assert "self-check: largest logit difference" in proc.stdout
    # the reference: PEFT's ties combination of the same two files, unmerged
    base = AutoModelForCausalLM.from_pretrained(saved["model"])
    theirs = peft.PeftModel.from_pretrained(base, saved["first"], adapter_name="one")
    theirs.load_adapter(saved["second"], adapter_name="two")
    theirs.add_weighted_adapter(["one", "two"], [0.7, 0.3], "mix", "ties", density=0.5)
    theirs.set_adapter("mix")
    merged = AutoModelForCausalLM.from_pretrained(out)
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(
            merged(input_ids=x).logits, theirs(input_ids=x).logits, atol=1e-5, rtol=1e-5
        )
    record = json.loads((out / "tilpass_record.json").read_text())
    assert record["merge"]["combination"] == "ties" and record["merge"]["density"] == 0.5
    assert record["merge"]["self_check"]["passed"] is True


def test_merge_refuses_bad_input_and_writes_nothing(
    saved: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other"
    shutil.copytree(saved["second"], other)
    config = json.loads((other / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "some/other-model"
    (other / "adapter_config.json").write_text(json.dumps(config))
    hashed, corrupt = tmp_path / "hashed", tmp_path / "corrupt"
    for directory, record in ((hashed, {"base_model": {"sha256": "ab" * 32}}), (corrupt, "{")):
        shutil.copytree(saved["second"], directory)
        text = record if isinstance(record, str) else json.dumps(record)
        (directory / "tilpass_record.json").write_text(text)
    (tmp_path / "first").mkdir()
    (tmp_path / "first" / "tilpass_record.json").write_text(
        json.dumps({"base_model": {"sha256": "cd" * 32}})
    )
    first_hashed = tmp_path / "first"
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(saved["first"] / name, first_hashed / name)
    base = ["merge", "--base", str(saved["model"]), "--adapter", str(saved["first"])]
    cases = [
        (["--adapter", str(tmp_path)], "is not an adapter directory"),
        (["--adapter", str(saved["second"]), "--weights", "0.5"], "1 weights for 2 adapters"),
        (["--adapter", str(other)], "different base models"),
        (["--adapter", str(saved["second"]), "--combination", "ties"], "needs --density"),
        (["--adapter", str(corrupt)], "tilpass_record.json is corrupt"),
    ]
    for extra, message in cases:
        out = tmp_path / "out"
        assert cli_main([*base, *extra, "--out", str(out)]) == 2
        assert message in capsys.readouterr().err
        assert not out.exists()
    hashes = ["merge", "--base", str(saved["model"]), "--adapter", str(first_hashed)]
    assert cli_main([*hashes, "--adapter", str(hashed), "--out", str(tmp_path / "out")]) == 2
    assert "different base models" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt", "first", "hashed", "other"]


def test_self_check_failure_warns_and_exits_one(
    saved: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli_main(
        [
            "merge", "--base", str(saved["model"]), "--adapter", str(saved["first"]),
            "--adapter", str(saved["second"]), "--tolerance", "-1", "--out", str(tmp_path / "m"),
        ]
    )  # fmt: skip
    assert code == 1
    assert "warning: the merge changed the logits" in capsys.readouterr().err
    single = ["merge", "--base", str(saved["model"]), "--adapter", str(saved["first"])]
    assert cli_main([*single, "--out", str(tmp_path / "one")]) == 0
    assert "of the largest logit" not in capsys.readouterr().err
    assert cli_main([*single, "--tolerance", "-1", "--out", str(tmp_path / "two")]) == 1
    assert "warning: the merge changed the logits" in capsys.readouterr().err
