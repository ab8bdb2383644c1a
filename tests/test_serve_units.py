"""The serving pieces without a server: the batch KV cache's joins and leaves, adapter path
resolution, the LRU adapter cache's eviction rules, sampling and stop strings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import DynamicCache

from tilpass.serve.adapters import AdapterCache, AdapterError, CacheFull, resolve_inside
from tilpass.serve.cli import parse_adapters
from tilpass.serve.kv import BatchCache, cache_tensors
from tilpass.serve.sampling import SamplingParams, TextTracker, sample


def filled(rows: int, width: int, start: float) -> tuple[DynamicCache, torch.Tensor]:
    """A 2-layer cache (rows, 1 head, width, 2) of distinct values and an all-ones mask."""
    values = torch.arange(rows * width * 2, dtype=torch.float32).view(rows, 1, width, 2) + start
    cache = DynamicCache(ddp_cache_data=[(values, -values), (2 * values, values)])
    return cache, torch.ones(rows, width, dtype=torch.long)


def test_batch_cache_rows_join_left_padded_and_leave_trimmed() -> None:
    batch = BatchCache()
    first, mask = filled(1, 3, 0.0)
    batch.append(first, mask)
    second, mask2 = filled(2, 5, 100.0)
    batch.append(second, mask2)
    assert batch.mask is not None and batch.mask.tolist() == [[0, 0, 1, 1, 1]] + [[1] * 5] * 2
    keys = cache_tensors(batch.cache)[0][0]  # type: ignore[arg-type]
    torch.testing.assert_close(keys[0, :, 2:], cache_tensors(first)[0][0][0])
    assert keys[0, :, :2].abs().sum() == 0  # padding holds zeros
    batch.keep([0])  # the longer rows leave: the padding columns go with them
    assert batch.mask.tolist() == [[1, 1, 1]]
    torch.testing.assert_close(cache_tensors(batch.cache)[1][1], cache_tensors(first)[1][1])
    mask3, positions = batch.step_inputs()
    assert mask3.tolist() == [[1, 1, 1, 1]] and positions.tolist() == [[3]]
    batch.keep([])
    assert batch.cache is None and batch.rows == 0


def test_masked_prefill_entries_are_zeroed() -> None:
    cache, _ = filled(1, 3, 1.0)
    cache.layers[0].keys[0, 0, 0] = float("nan")  # a fully masked query may leave NaN
    batch = BatchCache()
    batch.append(cache, torch.tensor([[0, 1, 1]]))
    assert torch.isfinite(cache_tensors(batch.cache)[0][0]).all()  # type: ignore[arg-type]


def adapter(root: Path, name: str, weights: bytes = b"x" * 10) -> Path:
    path = root / name
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text("{}")
    (path / "adapter_model.safetensors").write_bytes(weights)
    return path


def test_adapter_paths_stay_inside_the_adapter_dir(tmp_path: Path) -> None:
    root = tmp_path / "adapters"
    good = adapter(root, "good")
    assert resolve_inside(root, "good") == good.resolve()
    outside = adapter(tmp_path, "outside")
    (root / "link").symlink_to(outside)
    for relative, message in (
        ("../outside", "without '..'"),
        (str(outside), "relative to the adapter directory"),
        ("link", "leads outside"),
        ("missing", "no adapter"),
    ):
        with pytest.raises(AdapterError, match=message):
            resolve_inside(root, relative)


class FakeModel:
    """Records loads and deletes (the real ones are exercised by the server tests)."""

    def __init__(self) -> None:
        self.loaded: list[str] = []

    def load_adapter(self, path: Path, name: str) -> None:
        self.loaded.append(name)

    def delete_adapter(self, name: str) -> None:
        self.loaded.remove(name)

    def adapter_parameters(self, name: str) -> list[Any]:
        return []


def test_lru_evicts_the_least_recently_used_idle_adapter(tmp_path: Path) -> None:
    for name in ("a", "b", "c"):
        adapter(tmp_path, name)
    model = FakeModel()
    cache = AdapterCache(model, tmp_path, max_count=2, max_bytes=25)
    cache.ensure("a", busy=set())
    cache.ensure("b", busy=set())
    cache.ensure("a", busy=set())  # a is now the most recently used
    cache.ensure("c", busy=set())
    assert model.loaded == ["a", "c"]  # b went
    with pytest.raises(CacheFull, match="in use"):
        cache.ensure("b", busy={"a", "c"})  # never evicts an adapter a sequence runs on
    assert model.loaded == ["a", "c"]
    adapter(tmp_path, "big", b"x" * 30)
    with pytest.raises(AdapterError, match="over the cache's limit"):
        cache.known("big")


def test_sampling_is_seeded_and_top_p_keeps_the_head() -> None:
    logits = torch.tensor([3.0, 2.9, -5.0, -6.0])
    params = SamplingParams(max_tokens=1, temperature=1.0, top_p=0.5, seed=3)
    draws = {sample(logits, params, params.generator()) for _ in range(5)}
    assert draws == {sample(logits, params, params.generator())}  # same seed, same token
    assert draws <= {0}  # token 0 alone reaches top_p


def test_stop_strings_hold_back_a_possible_start(tiny_tokenizer: Any) -> None:
    tracker = TextTracker(tiny_tokenizer, stop=("four.",))
    sent = ""
    for token in tiny_tokenizer("The answer is four. Then more")["input_ids"]:
        sent += tracker.add(token, special=False)
        assert not sent.endswith("fou")  # a stop string's start is never sent early
        if tracker.stopped:
            break
    assert tracker.stopped and sent + tracker.flush() == "The answer is "


def test_adapter_flags_are_name_equals_dir() -> None:
    assert parse_adapters(["medical=/x"]) == [("medical", Path("/x"))]
    for bad in ("medical", "=x", "../a=/x"):
        with pytest.raises((ValueError, AdapterError)):
            parse_adapters([bad])
