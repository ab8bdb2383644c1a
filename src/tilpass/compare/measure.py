"""Inference measurements of one model as it runs: decode-step and prefill latency, sizes.

A decode step is timed through `generate`, so every method runs its own inference path
(prompt tuning prepends its virtual tokens at the prefill, then decodes from the KV cache):
the time of `generate` for 1 + k new tokens minus the time for 1 token, divided by k, is the
mean time of one decode step after the prefill. The prefill is one forward of 128 tokens at
batch 1. Each figure is the median of a few repeats after a warm-up; ratios to the base model
are computed by the report from the base model's row, measured the same way.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

PROMPT_TOKENS = 16
"""Prompt length of the decode-step measurement."""

PREFILL_TOKENS = 128


@dataclass(frozen=True)
class LatencySettings:
    """How much timing each measurement gets (the defaults suit a 0.1B model on a CPU)."""

    decode_steps: int = 8
    repeats: int = 3
    seed: int = 0


@dataclass
class Latency:
    """Milliseconds per call: one decode step at batch 1 and 8, and a 128-token prefill."""

    decode_b1_ms: float
    decode_b8_ms: float
    prefill_128_ms: float

    def to_dict(self) -> dict[str, float]:
        """Plain data for the result file."""
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(call: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Median wall time of `call` in milliseconds, after one untimed warm-up call."""
    call()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        call()
        _sync(device)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _tokens(vocab: int, batch: int, length: int, seed: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, max(vocab, 4), (batch, length), generator=gen).to(device)


def _generate(model: Any, ids: torch.Tensor, new_tokens: int, pad_token_id: int) -> Any:
    return model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=pad_token_id,
    )


def decode_step_ms(
    model: Any, vocab: int, batch: int, settings: LatencySettings, pad_token_id: int
) -> float:
    """Mean time of one decode step at `batch` rows after a `PROMPT_TOKENS` prefill."""
    device = next(model.parameters()).device
    ids = _tokens(vocab, batch, PROMPT_TOKENS, settings.seed, device)
    k = settings.decode_steps
    first = _median_ms(lambda: _generate(model, ids, 1, pad_token_id), device, settings.repeats)
    total = _median_ms(lambda: _generate(model, ids, 1 + k, pad_token_id), device, settings.repeats)
    return max(total - first, 0.0) / k


def prefill_ms(model: Any, vocab: int, settings: LatencySettings) -> float:
    """Time of one forward over `PREFILL_TOKENS` tokens at batch 1 (no cache kept)."""
    device = next(model.parameters()).device
    ids = _tokens(vocab, 1, PREFILL_TOKENS, settings.seed, device)
    mask = torch.ones_like(ids)
    return _median_ms(
        lambda: model(input_ids=ids, attention_mask=mask, use_cache=False),
        device,
        settings.repeats,
    )


@torch.no_grad()
def measure_latency(model: Any, tokenizer: Any, settings: LatencySettings) -> Latency:
    """Decode-step latency at batch 1 and 8 and the 128-token prefill of `model` in eval mode."""
    model.eval()
    vocab = len(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return Latency(
        decode_b1_ms=decode_step_ms(model, vocab, 1, settings, pad),
        decode_b8_ms=decode_step_ms(model, vocab, 8, settings, pad),
        prefill_128_ms=prefill_ms(model, vocab, settings),
    )


def parameter_count(model: torch.nn.Module) -> int:
    """Parameters the model holds (a packed 4-bit weight counts the weights it stores)."""
    from tilpass.quantize import logical_numel

    return sum(logical_numel(p) for p in model.parameters())


def files_bytes(directory: Path, pattern: str = "*.safetensors") -> int:
    """Bytes on disk of the weight files in `directory` (the adapter, or the full model)."""
    return sum(p.stat().st_size for p in directory.glob(pattern))
