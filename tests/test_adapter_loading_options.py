"""Loading options PEFT code passes: `device_map` (one device, or "auto"; several refused)
and PEFT's pickle file `adapter_model.bin` (refused by default; on request read only through
torch's weights-only loader)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import tilpass
from tests.helpers import lora, tiny_llama, tokens
from tests.parity import perturb


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens()).logits


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    """A LoRA adapter (non-zero B) saved as safetensors and as PEFT's pickle, and its logits."""
    model = tilpass.get_peft_model(tiny_llama(), lora(init_lora_weights=False)).eval()
    perturb(model.adapter_parameters("default"), seed=3)
    root = tmp_path_factory.mktemp("loading")
    model.save_pretrained(root / "safe")
    model.save_pretrained(root / "bin", safe_serialization=False)
    assert not torch.equal(logits(model), logits(tiny_llama()))
    return root, logits(model)


@pytest.mark.parametrize(
    "device_map", ["cpu", {"": "cpu"}, {"model": "cpu", "lm_head": "cpu"}, "auto"]
)
def test_device_map_on_one_device_loads(
    device_map: object, saved: tuple[Path, torch.Tensor]
) -> None:
    root, expected = saved
    model = tilpass.AdaptedModel.from_pretrained(tiny_llama(), root / "safe", device_map=device_map)
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("device_map", "message"),
    [
        ({"model": "cpu", "lm_head": "meta"}, "does not spread a model over devices"),
        ({"": "disk"}, "'disk'"),
        ("nowhere", "is not a device"),
    ],
)
def test_device_map_that_tilpass_cannot_honour_is_refused(
    device_map: object, message: str, saved: tuple[Path, torch.Tensor]
) -> None:
    root, _ = saved
    with pytest.raises((NotImplementedError, ValueError), match=message):
        tilpass.AdaptedModel.from_pretrained(tiny_llama(), root / "safe", device_map=device_map)


def test_peft_pickle_file_loads_with_torch_s_weights_only_loader_on_request(
    saved: tuple[Path, torch.Tensor],
) -> None:
    root, expected = saved
    assert not (root / "bin" / "adapter_model.safetensors").exists()
    with pytest.raises(tilpass.AdapterFileError, match=r"adapter_model\.bin: pickle files are not"):
        tilpass.AdaptedModel.from_pretrained(tiny_llama(), root / "bin")
    model = tilpass.AdaptedModel.from_pretrained(tiny_llama(), root / "bin", allow_pickle=True)
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=0)


def test_pickle_with_objects_other_than_tensors_is_refused(tmp_path: Path) -> None:
    model = tilpass.get_peft_model(tiny_llama(), lora())
    model.save_pretrained(tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    torch.save({"x": torch.zeros(1), "evil": print}, tmp_path / "adapter_model.bin")
    with pytest.raises(tilpass.AdapterFileError, match="weights-only loader"):
        tilpass.AdaptedModel.from_pretrained(tiny_llama(), tmp_path, allow_pickle=True)


def test_low_cpu_mem_usage_injection_is_on_meta_until_loaded() -> None:
    source = tilpass.get_peft_model(tiny_llama(), lora()).eval()
    perturb(source.adapter_parameters("default"), seed=4)
    state = tilpass.get_peft_model_state_dict(source)
    model = tilpass.inject_adapter_in_model(lora(), tiny_llama(), low_cpu_mem_usage=True)
    assert "meta" in {p.device.type for p in model.parameters()}
    result = tilpass.set_peft_model_state_dict(model, state)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    with torch.no_grad():
        torch.testing.assert_close(model(tokens()).logits, logits(source), rtol=0, atol=0)
