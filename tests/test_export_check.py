"""`tilpass export --check vllm|lorax|peft [--fix]`: each rule on a crafted adapter, the exact
rank-padding fix compared with PEFT's output for the original, and bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from helpers import lora, tiny_llama, tokens

import tilpass
from tilpass.cli import main as cli_main

os.environ.setdefault("HF_HUB_OFFLINE", "1")
peft = pytest.importorskip("peft")

pytestmark = [pytest.mark.filterwarnings("ignore:adapter '.*' is .* MiB:UserWarning")]


def save(directory: Path, **overrides: object) -> Path:
    """A random LoRA adapter for the tiny Llama, saved in the PEFT layout."""
    torch.manual_seed(4)
    tilpass.get_peft_model(tiny_llama(), lora(**overrides)).save_pretrained(directory)
    return directory


def with_config(directory: Path, **changes: object) -> Path:
    """Edit `adapter_config.json` in place (for rules that read only the config)."""
    path = directory / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return directory


def export(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = cli_main(["export", *args])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export")
    return {
        "plain": save(root / "plain"),
        "r32": save(root / "r32", r=32, lora_alpha=32),
        "dora": save(root / "dora", use_dora=True),
        "saved": save(root / "saved", modules_to_save=["lm_head"]),
        "bias": save(root / "bias", lora_bias=True),
        "embed": save(root / "embed", target_modules=["q_proj", "embed_tokens"]),
        "pattern": save(
            root / "pattern",
            target_modules=["q_proj", "v_proj", "down_proj"],
            rank_pattern={"v_proj": 2, "down_proj": 6},
            alpha_pattern={"down_proj": 3},
            use_rslora=True,
        ),
        "adalora": with_config(save(root / "adalora"), peft_type="ADALORA"),
        "bottleneck": with_config(save(root / "bottleneck"), peft_type="BOTTLENECK"),
    }


@pytest.mark.parametrize(
    ("name", "server", "code", "expected"),
    [
        ("plain", "vllm", 0, "loads in vllm as it is"),
        ("plain", "lorax", 0, "loads in lorax as it is"),
        ("r32", "vllm", 1, "start vLLM with --max-lora-rank 32"),
        ("dora", "vllm", 1, "[does not load] dora"),
        ("dora", "peft", 0, "loads in peft as it is"),
        ("saved", "lorax", 1, "[does not load] modules_to_save"),
        ("bias", "vllm", 1, "lora_bias: true"),
        ("embed", "vllm", 1, "vllm does not adapt embed_tokens"),
        ("pattern", "vllm", 1, "[fixable (exact)] ranks"),
        ("adalora", "vllm", 1, "needs conversion"),
        ("bottleneck", "peft", 1, "PEFT has no such method"),
    ],
)
def test_each_rule(
    adapters: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    name: str,
    server: str,
    code: int,
    expected: str,
) -> None:
    got, text = export(capsys, str(adapters[name]), "--check", server)
    assert got == code and expected in text, text
    if name == "adalora":
        assert f"tilpass export {adapters[name]} --to lora" in text


def test_fix_pads_ranks_exactly(
    adapters: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "fixed"
    code, text = export(
        capsys, str(adapters["pattern"]), "--check", "vllm", "--fix", "--out", str(out)
    )
    assert code == 0 and "padded to rank 6" in text and "loads in vllm as it is" in text, text
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 6 and config["rank_pattern"] == {} and config["alpha_pattern"] == {}
    # PEFT runs the original (rank and alpha patterns) and the padded copy: the same logits
    x = tokens()
    with torch.no_grad():
        original = peft.PeftModel.from_pretrained(tiny_llama(), adapters["pattern"])(x).logits
        fixed = peft.PeftModel.from_pretrained(tiny_llama(), out)(x).logits
        base = tiny_llama()(x).logits
    assert not torch.allclose(original, base, atol=1e-3)
    torch.testing.assert_close(fixed, original, atol=1e-6, rtol=1e-6)


def test_fix_refuses_a_lossy_change_and_bad_input(
    adapters: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "fixed"
    code, text = export(
        capsys, str(adapters["dora"]), "--check", "vllm", "--fix", "--out", str(out)
    )
    assert code == 2 and "--fix wrote nothing: dora" in text and not out.exists()
    code, text = export(capsys, str(tmp_path), "--check", "vllm")
    assert code == 2 and "is not an adapter directory" in text
    code, text = export(capsys, str(adapters["plain"]), "--check", "vllm", "--fix")
    assert code == 2 and "--out NEW_DIR" in text
