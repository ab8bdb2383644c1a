"""CPU time per generated token of the serving engine, in-process, next to its peers.

Wall-clock throughput on a shared machine says little; the CPU time a process spends per
output token (`time.process_time`, all its threads) suffers much less from other load. On
the same requests (`--requests` prompts of `--prompt-words` words, exactly `--max-tokens`
new tokens each, `--rows` sequences at a time):

- the engine's packed path (one forward pass per step, a KV slot per sequence), 16 adapters;
- the engine's padded path (left-padded prefill and decode passes), 16 adapters;
- batched `generate` with per-row adapters (batches of `--rows`);
- transformers' continuous batching (`generate_batch`, what `transformers serve
  --continuous-batching` runs) on the base with adapter 0 merged.

Usage (one torch thread, as the load test runs):

    OMP_NUM_THREADS=1 python benchmarks/serve_step.py
    OMP_NUM_THREADS=1 python benchmarks/serve_step.py --tiny --requests 8 --max-tokens 4
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from serve_load import Load, prepare

import tilpass
from tilpass.pretrained import DEFAULT_MODEL, load_model
from tilpass.serve.adapters import AdapterCache
from tilpass.serve.engine import Engine, Event, Request
from tilpass.serve.sampling import SamplingParams


class Counter:
    """Sink that counts tokens and notes when its request is done."""

    def __init__(self) -> None:
        self.tokens = 0
        self.done = threading.Event()

    def __call__(self, event: Event) -> None:
        self.tokens += event.token is not None
        if event.kind in ("finish", "error"):
            self.done.set()


def measure(run: Any) -> dict[str, float]:
    """Run `run()` (which returns the tokens it generated); CPU and wall seconds per token."""
    wall, cpu = time.perf_counter(), time.process_time()
    tokens = run()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {
        "tokens": tokens,
        "cpu_ms_per_token": round(1000 * cpu / tokens, 2),
        "wall_tokens_per_s": round(tokens / wall, 1),
    }


def engine_run(
    model: Any, tokenizer: Any, prompts: list[list[int]], args: Any, packed: bool
) -> int:
    """Every prompt through an in-process engine with `args.rows` rows; tokens generated."""
    cache = AdapterCache(model, None, max_count=64, max_bytes=1 << 34)
    names = [f"a{i}" for i in range(args.adapters)]
    for name in names:
        cache.adopt(name)
    engine = Engine(model, tokenizer, cache, args.rows, len(prompts), packed=packed)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    sinks = [Counter() for _ in prompts]
    for i, (prompt, sink) in enumerate(zip(prompts, sinks, strict=True)):
        engine.submit(Request(str(i), names[i % len(names)], prompt, params, sink))
    engine.start()
    for sink in sinks:
        sink.done.wait()
    engine.stop(1)
    return sum(s.tokens for s in sinks)


def generate_run(model: Any, tokenizer: Any, prompts: list[list[int]], args: Any) -> int:
    """Batched `generate`, `args.rows` rows at a time, each routed to its adapter."""
    tokens = 0
    for start in range(0, len(prompts), args.rows):
        rows = prompts[start : start + args.rows]
        width = max(map(len, rows))
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in rows])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in rows])
        names = [f"a{(start + i) % args.adapters}" for i in range(len(rows))]
        with torch.no_grad():
            out = model.generate(
                ids, attention_mask=mask, adapter_names=names, do_sample=False,
                max_new_tokens=args.max_tokens, min_new_tokens=args.max_tokens,
                pad_token_id=tokenizer.pad_token_id,
            )  # fmt: skip
        tokens += (out.shape[1] - width) * len(rows)
    return tokens


def peer_run(merged: Any, prompts: list[list[int]], args: Any) -> int:
    """transformers' continuous batching (`generate_batch`) on the merged model."""
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=args.max_tokens, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    out = merged.generate_batch(prompts, generation_config=config, progress_bar=False)
    return sum(len(o.generated_tokens) for o in out.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--tiny", action="store_true", help="a small random Llama instead")
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--adapters", type=int, default=16)
    p.add_argument("--prompt-words", type=int, default=24)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--systems", default="packed,padded,generate,peer")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="serve-step-"))
    model_dir, adapter_dir, merged_dir = prepare(work, args.model, args.tiny, args.adapters)
    base, tokenizer = load_model(str(model_dir))
    model = tilpass.AdaptedModel(base)
    for i in range(args.adapters):
        model.load_adapter(adapter_dir / f"a{i}", f"a{i}")
    model.eval()
    texts = Load(args.rows, args.requests // args.rows, args.prompt_words, 4).prompts()
    prompts = [tokenizer(t)["input_ids"] for t in texts][: args.requests]
    runs = {
        "packed": lambda ps: engine_run(model, tokenizer, ps, args, packed=True),
        "padded": lambda ps: engine_run(model, tokenizer, ps, args, packed=False),
        "generate": lambda ps: generate_run(model, tokenizer, ps, args),
    }
    if "peer" in args.systems:
        merged, _ = load_model(str(merged_dir))
        runs["peer"] = lambda ps: peer_run(merged.eval(), ps, args)
    for name in args.systems.split(","):
        runs[name](prompts[:2])  # warm-up (allocations, first calls)
        result = measure(lambda: runs[name](prompts))  # noqa: B023 - called at once
        print(json.dumps({"system": name, **result}), flush=True)


if __name__ == "__main__":
    main()
