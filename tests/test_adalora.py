"""AdaLoRA: the SVD-form layer, the regulariser, the budget schedule and allocator, PEFT interop
both ways, the export to plain LoRA, mixed batches and a short run of the trainer.

PEFT's own AdaLoRA is the reference for the allocator: both libraries train the same tiny
model from the same weights, step for step, and must prune the same triplets. Every adapter
tensor compared is non-zero (Lambda included), so a loader that leaves one at zero fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests import helpers
from tests.reference import adalora_ref
from tilpass import AdaptedModel
from tilpass.methods.adalora import AdaLoraConfig, AdaLoraLinear
from tilpass.methods.adalora.allocator import budget_schedule
from tilpass.methods.adalora.report import report
from tilpass.methods.adalora.training import AdaLoraTraining, orthogonal_regulariser
from tilpass.routing import BASE
from tilpass.run_report import card_lines, figure_files, method_reports

os.environ.setdefault("HF_HUB_OFFLINE", "1")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.filterwarnings("ignore:adapter '.*' is .* MiB:UserWarning")

TOL = {"atol": 1e-5, "rtol": 1e-5}
TARGETS = ["q_proj", "v_proj", "down_proj"]
SCHEDULE = {"init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 2, "total_step": 8}
STEPS = 8


def ours(**overrides: Any) -> AdaLoraConfig:
    return AdaLoraConfig(**{"target_modules": TARGETS, **SCHEDULE, **overrides})


def batch(seed: int = 3) -> dict[str, torch.Tensor]:
    ids = helpers.tokens(batch=4, length=8, seed=seed)
    return {"input_ids": ids, "labels": ids}


def logits(model: Any, ids: torch.Tensor, **kw: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


# -- the layer --------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_svd_layer_matches_float64_reference(family: str) -> None:
    """Forward (with and without gradients) and merging equal the float64 formula."""
    base = helpers.tiny_llama() if family == "llama" else helpers.tiny_gpt2()
    target = ["q_proj"] if family == "llama" else ["c_attn"]
    model = AdaptedModel(base, ours(target_modules=target, init_lora_weights=False, lora_alpha=6))
    name, layer = next((n, m) for n, m in base.named_modules() if isinstance(m, AdaLoraLinear))
    p, e, q = layer.triplets("default")
    assert bool((e != 0).all()) and bool((q != 0).all())
    x = torch.randn(3, 5, layer.in_features)
    w = layer.base_layer.weight
    w = w.T if layer.transposed else w
    scale = 6 / (4 + 1e-5)
    expected = adalora_ref.svd_linear(x, w, layer.base_layer.bias, p, e, q, scale)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            torch.testing.assert_close(layer(x).double(), expected, **TOL)
    with torch.no_grad():
        layer.merge(["default"])
        torch.testing.assert_close(layer.base_forward(x).double(), expected, **TOL)
        layer.unmerge()
    assert name and model.peft_config["default"].peft_type == "ADALORA"


def test_orthogonal_regulariser_value_and_gradient() -> None:
    """Value and gradient equal the direct float64 computation, matrix by matrix."""
    g = torch.Generator().manual_seed(0)
    shapes = [((4, 32), (16, 4)), ((4, 32), (16, 4)), ((3, 64), (32, 3))]
    pairs = [
        (
            torch.randn(*sp, generator=g, dtype=torch.float64, requires_grad=True),
            torch.randn(*sq, generator=g, dtype=torch.float64, requires_grad=True),
        )
        for sp, sq in shapes
    ]
    value = orthogonal_regulariser(pairs)
    expected = adalora_ref.orth_penalty([(p.detach(), q.detach()) for p, q in pairs])
    torch.testing.assert_close(value.detach(), expected)
    value.backward()
    for p, _ in pairs:
        want = adalora_ref.orth_penalty_grad_p(p.detach(), 2 * len(pairs))
        torch.testing.assert_close(p.grad, want)
    direct = [
        (p.detach().clone().requires_grad_(), q.detach().clone().requires_grad_()) for p, q in pairs
    ]
    adalora_ref.orth_penalty(direct).backward()
    for (_, q), (_, q_direct) in zip(pairs, direct, strict=True):
        torch.testing.assert_close(q.grad, q_direct.grad)


@pytest.mark.parametrize("step", [0, 1, 2, 3, 4, 5, 6, 7, 12])
def test_budget_schedule_is_the_cubic_formula(step: int) -> None:
    config = AdaLoraConfig(init_r=12, target_r=4, tinit=1, tfinal=3, total_step=10, deltaT=2)
    budget, mask = budget_schedule(step, 120, 40, config, 10)
    assert budget == adalora_ref.cubic_budget(step, 120, 40, 1, 3, 10)
    assert mask == (step > 7 or (step > 1 and step % 2 == 0))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"tinit": 4, "tfinal": 4, "total_step": 8}, r"tinit \(4\) \+ tfinal \(4\) >= total_step"),
        ({"target_r": 8, "init_r": 4}, "must not exceed init_r"),
        ({"beta1": 1.0}, r"beta1 must be in \(0, 1\)"),
        ({"orth_reg_weight": -1.0}, "orth_reg_weight must be >= 0"),
        ({"rank_pattern": {"q_proj.lora_E": [1, 2]}}, "list of booleans"),
    ],
)
def test_config_errors_are_clear(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AdaLoraConfig(**settings)


# -- allocator and files, against PEFT ------------------------------------------------------


def step_both(peft_model: Any, model: AdaptedModel, hook: AdaLoraTraining) -> None:
    """The same SGD steps on both; allocation in PEFT's order (after the optimizer step)."""
    opt_theirs = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
    opt_ours = torch.optim.SGD(model.adapter_parameters("default"), lr=0.5)
    for step in range(STEPS):
        inputs = batch(seed=step)
        peft_model(**inputs).loss.backward()
        opt_theirs.step()
        peft_model.base_model.update_and_allocate(step)
        opt_theirs.zero_grad()
        (model(**inputs).loss + hook.loss_term(step)).backward()
        opt_ours.step()
        if hook.allocator.wants_scores(step):
            hook.allocator.update_scores()
        hook.allocator.allocate(step)
        opt_ours.zero_grad()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """PEFT and tilpass trained side by side from the same weights; both saved."""
    root = tmp_path_factory.mktemp("adalora")
    theirs = peft.get_peft_model(
        helpers.tiny_llama(),
        peft.AdaLoraConfig(target_modules=TARGETS, task_type="CAUSAL_LM", **SCHEDULE),
    )
    model = AdaptedModel(helpers.tiny_llama(), ours())
    state = peft.utils.get_peft_model_state_dict(theirs)
    with torch.no_grad():
        for key, tensor in model.adapter_state_dict("default").items():
            tensor.copy_(state[key])
    theirs.train()
    model.train()
    hook = AdaLoraTraining(model, "default")
    step_both(theirs, model, hook)
    theirs.eval()
    model.eval()
    theirs.save_pretrained(root / "peft")
    model.save_pretrained(root / "ours")
    ids = helpers.tokens(seed=9)
    return {"root": root, "peft": theirs, "ours": model, "hook": hook, "ids": ids}


def test_allocator_prunes_as_peft_does(trained: dict[str, Any]) -> None:
    """Same Lambda (pruned entries included) and the same rank_pattern as PEFT's."""
    theirs, model = trained["peft"], trained["ours"]
    expected = {
        k.removesuffix(".default"): v for k, v in theirs.peft_config["default"].rank_pattern.items()
    }
    assert model.peft_config["default"].rank_pattern == expected
    state = peft.utils.get_peft_model_state_dict(theirs)  # truncated to the kept triplets
    mine = model.adapter_state_dict("default")
    for key in state:
        torch.testing.assert_close(mine[key], state[key], **TOL)


def test_final_budget_is_the_target_and_ranks_differ(trained: dict[str, Any]) -> None:
    ranks = trained["hook"].allocator.kept_ranks()
    assert sum(ranks.values()) == SCHEDULE["target_r"] * len(ranks) == 12
    assert len(set(ranks.values())) > 1, ranks
    layers = [m for m in trained["ours"].adapter_layer_list() if isinstance(m, AdaLoraLinear)]
    for layer in layers:
        e = layer.lora_E["default"].view(-1)
        assert int((e != 0).sum()) == layer.kept_rank("default")
    made = report(trained["ours"], "default")
    assert made is not None and "kept rank 12 of 24" in made.lines[-1]
    assert method_reports(trained["ours"]) != []  # found through the registry
    assert method_reports(helpers.tiny_llama()) == []  # full fine-tuning: no adapters
    card = card_lines([made])
    assert card[1] == "## AdaLoRA final ranks (default)" and "![" in card[-1]
    assert figure_files([made])["adalora_ranks.png"].startswith(b"\x89PNG")


def test_peft_pruned_adapter_loads_in_tilpass(trained: dict[str, Any]) -> None:
    """PEFT's file (truncated tensors + rank_pattern) gives PEFT's logits in tilpass."""
    root, ids = trained["root"], trained["ids"]
    saved = json.loads((root / "peft" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADALORA" and saved["rank_pattern"]
    loaded = AdaptedModel.from_pretrained(helpers.tiny_llama(), root / "peft")
    torch.testing.assert_close(logits(loaded, ids), logits(trained["peft"], ids), **TOL)


def test_tilpass_file_loads_in_peft(trained: dict[str, Any]) -> None:
    root, ids = trained["root"], trained["ids"]
    ours_keys = load_file(root / "ours" / "adapter_model.safetensors")
    peft_keys = load_file(root / "peft" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in ours_keys.items()} == {k: v.shape for k, v in peft_keys.items()}
    loaded = peft.PeftModel.from_pretrained(helpers.tiny_llama(), root / "ours")
    torch.testing.assert_close(logits(loaded, ids), logits(trained["ours"], ids), **TOL)


def test_export_to_lora_cli(trained: dict[str, Any]) -> None:
    """`tilpass export --to lora`: a LORA file with per-module ranks, equal logits in PEFT
    and in tilpass, no zeroed triplets."""
    root, ids = trained["root"], trained["ids"]
    out = root / "lora"
    done = subprocess.run(
        [sys.executable, "-m", "tilpass.cli", "export", str(root / "peft"), "--to", "lora",
         "--out", str(out)],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    tensors = load_file(out / "adapter_model.safetensors")
    ranks = trained["hook"].allocator.kept_ranks()
    for path, rank in ranks.items():
        assert tensors[f"base_model.model.{path}.lora_A.weight"].shape[0] == rank
        assert bool((tensors[f"base_model.model.{path}.lora_A.weight"].abs().sum(1) > 0).all())
    expected = logits(trained["peft"], ids)
    lora = peft.PeftModel.from_pretrained(helpers.tiny_llama(), out)
    assert lora.peft_config["default"].peft_type == "LORA"
    torch.testing.assert_close(logits(lora, ids), expected, **TOL)
    mine = AdaptedModel.from_pretrained(helpers.tiny_llama(), out)
    torch.testing.assert_close(logits(mine, ids), expected, **TOL)


def test_export_refuses_other_methods(trained: dict[str, Any], capsys: Any) -> None:
    """A LoRA input, or an existing --out, is refused with a clear message; nothing written."""
    from tilpass.cli import main

    root = trained["root"]
    lora_dir = root / "plain"
    AdaptedModel(helpers.tiny_llama(), helpers.lora()).save_pretrained(lora_dir)
    assert main(["export", str(lora_dir), "--to", "lora", "--out", str(root / "x")]) == 2
    assert "exports ADALORA adapters" in capsys.readouterr().err
    assert main(["export", str(root / "peft"), "--to", "lora", "--out", str(lora_dir)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert not (root / "x").exists()


def test_export_check_fix_converts_adalora_for_vllm(trained: dict[str, Any], capsys: Any) -> None:
    """`export --check vllm --fix`: AdaLoRA needs conversion, which --fix does (then pads the
    per-module ranks to one): one plain LoRA file with PEFT's logits, nothing left over."""
    from tilpass.cli import main

    root, ids = trained["root"], trained["ids"]
    out = root / "for-vllm"
    code = main(["export", str(root / "peft"), "--check", "vllm", "--fix", "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "needs conversion" in text and "loads in vllm as it is" in text
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and not config["rank_pattern"]
    assert [p.name for p in root.iterdir() if p.name.startswith(".for-vllm")] == []
    lora = peft.PeftModel.from_pretrained(helpers.tiny_llama(), out)
    torch.testing.assert_close(logits(lora, ids), logits(trained["peft"], ids), **TOL)


def test_mixed_batch_takes_adalora_adapters(trained: dict[str, Any]) -> None:
    """adapter_names per row: each row equals its adapter's own forward (natively)."""
    model = AdaptedModel.from_pretrained(helpers.tiny_llama(), trained["root"] / "peft", "a")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.add_adapter("b", ours(init_lora_weights=False, init_r=3, target_r=2))
    ids = trained["ids"]
    got = logits(model, ids, adapter_names=["a", "b", BASE, "a"])
    for row, name in enumerate(["a", "b", BASE, "a"]):
        if name == BASE:
            with model.disable_adapter():
                single = logits(model, ids[row : row + 1])
        else:
            model.set_adapter(name)
            single = logits(model, ids[row : row + 1])
        torch.testing.assert_close(got[row : row + 1], single, **TOL)


# -- the trainer ------------------------------------------------------------------------------


def test_trainer_runs_hooks_and_fills_total_step(tmp_path: Path) -> None:
    """total_step from the step plan, the regulariser in the log, the target budget reached."""
    from tests.test_train import cfg, collate, make_items
    from tilpass.train import train

    model = AdaptedModel(helpers.tiny_llama(), ours(total_step=None))
    train(model, make_items(16), None, collate, cfg(max_steps=STEPS), tmp_path / "run")
    config = model.peft_config["default"]
    assert config.total_step == STEPS
    kept = [sum(v) for v in config.rank_pattern.values()]
    assert sum(kept) == SCHEDULE["target_r"] * len(kept)
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    terms = [e["loss_terms"]["adalora_orth_reg"] for e in events if e.get("event") == "train"]
    assert len(terms) == STEPS and all(t > 0 for t in terms)
    with pytest.raises(ValueError, match=r"tinit \(1\) \+ tfinal \(2\) >= total_step \(3"):
        fresh = AdaptedModel(helpers.tiny_llama(), ours(total_step=None))
        train(fresh, make_items(16), None, collate, cfg(max_steps=3), tmp_path / "short")


def test_export_leaves_out_fully_pruned_modules(trained: dict[str, Any]) -> None:
    """A module whose triplets were all pruned is left out (target_modules lists the rest);
    the largest rank is r and the others are anchored rank_pattern / alpha_pattern keys."""
    from tilpass.adapter_files import save_tensors
    from tilpass.methods.adalora import export_lora

    root, ids = trained["root"], trained["ids"]
    source = root / "one-pruned"
    tensors = load_file(root / "peft" / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_E"
    tensors[key] = torch.zeros_like(tensors[key])
    source.mkdir()
    save_tensors(source / "adapter_model.safetensors", tensors, metadata={"format": "pt"})
    (source / "adapter_config.json").write_text((root / "peft" / "adapter_config.json").read_text())
    config = export_lora(source, root / "one-pruned-lora")
    assert "model.layers.1.mlp.down_proj" not in config.target_modules
    assert len(config.target_modules) == 5
    assert config.r == max(trained["hook"].allocator.kept_ranks().values())
    assert all(key.startswith("^model\\.layers\\.") for key in config.rank_pattern)
    expected = logits(AdaptedModel.from_pretrained(helpers.tiny_llama(), source), ids)
    lora = peft.PeftModel.from_pretrained(helpers.tiny_llama(), root / "one-pruned-lora")
    torch.testing.assert_close(logits(lora, ids), expected, **TOL)


def test_tilpass_train_adalora_end_to_end(tmp_path: Path) -> None:
    """`tilpass train --method adalora` (a real subprocess): the rank table at the end, the
    PNG and the table in the adapter directory and card, total_step from the step plan."""
    from tests.test_cli import common, save_tiny_model, tilpass, write_data

    model = save_tiny_model(tmp_path / "model")
    train, test = write_data(tmp_path)
    out = tmp_path / "run"
    settings = ["--adalora.target_modules", "[q_proj, v_proj]", "--adalora.init_r", "4"]
    settings += ["--adalora.target_r", "2", "--adalora.tinit", "1", "--adalora.tfinal", "2"]
    args = common(model, train, test, out, steps=6, lora=False)
    proc = tilpass("train", *args, "--method", "adalora", *settings, cwd=tmp_path)
    assert "AdaLoRA final ranks (default)" in proc.stdout
    assert "| layer | q_proj | v_proj |" in proc.stdout
    adapter = out / "adapter"
    assert (adapter / "adalora_ranks.png").read_bytes().startswith(b"\x89PNG")
    card = (adapter / "README.md").read_text()
    assert "## AdaLoRA final ranks (default)" in card and "(adalora_ranks.png)" in card
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["total_step"] == 6
    kept = [sum(mask) for mask in config["rank_pattern"].values()]
    assert sum(kept) == 2 * len(kept) and f"kept rank {sum(kept)} of {4 * len(kept)}" in card
