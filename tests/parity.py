"""PEFT parity checks for any small model: files both ways, outputs, exact key sets.

Each check builds the same base model twice (same seed), adds a LoRA adapter with the same
settings in PEFT and in tilpass, perturbs every adapter tensor so none is zero, and compares
whole output tensors and the saved state-dict keys.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

import tilpass

TOL = {"atol": 1e-5, "rtol": 1e-5}


def perturb(params: list[nn.Parameter], seed: int) -> None:
    """Add seeded noise to every tensor, so a file that loads as zeros cannot match."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.1)


def outputs(model: nn.Module, x: Any) -> torch.Tensor:
    """The model's output tensor (a transformers model's logits)."""
    with torch.no_grad():
        out = model(x)
    return out.logits if hasattr(out, "logits") else out


def peft_both_ways(
    make_base: Callable[[], nn.Module],
    settings: dict[str, Any],
    x: Any,
    tmp_path: Path,
    ours_seed: int = 0,
) -> None:
    """Saved by PEFT -> loaded by tilpass, and saved by tilpass -> loaded by PEFT: identical
    outputs, identical keys, and the adapter changes the base output."""
    import peft

    base_out = outputs(make_base(), x)
    theirs = peft.get_peft_model(make_base(), peft.LoraConfig(**settings)).eval()
    perturb([p for p in theirs.parameters() if p.requires_grad], seed=11)
    theirs.save_pretrained(tmp_path / "peft")
    ours = tilpass.AdaptedModel.from_pretrained(make_base(), tmp_path / "peft").eval()
    torch.testing.assert_close(outputs(ours, x), outputs(theirs, x), **TOL)
    assert not torch.allclose(outputs(ours, x), base_out)
    torch.manual_seed(ours_seed)
    model = tilpass.get_peft_model(make_base(), tilpass.LoraConfig(**settings)).eval()
    perturb(model.adapter_parameters("default"), seed=12)
    model.save_pretrained(tmp_path / "ours")
    loaded = peft.PeftModel.from_pretrained(make_base(), tmp_path / "ours").eval()
    assert set(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == set(
        peft.utils.get_peft_model_state_dict(loaded, save_embedding_layers="auto")
    )  # an exact key match: a wrong key "loads" in PEFT with only a warning
    torch.testing.assert_close(outputs(loaded, x), outputs(model, x), **TOL)
    assert not torch.allclose(outputs(model, x), base_out)
