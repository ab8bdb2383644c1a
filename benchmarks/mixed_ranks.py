"""Mixed batches of adapters with different ranks: each rank pays its own cost.

On the core benchmark's model (random Llama, hidden 1024, 8 layers, fp32), LoRA on q,k,v,o,
gate,up,down. Three models, timed interleaved in one process on the same token batch whose
rows cycle over 8 adapters:

- `uniform`: all 8 adapters at rank `--low` (the floor);
- `mixed`: 7 adapters at rank `--low`, 1 at rank `--high` (the case measured);
- `padded`: all 8 at rank `--high`, which is what a stack padded to the largest rank costs
  (every row then pays the largest rank, as tilpass's mixed path did before it grouped by rank).

Reported: time ratios to `uniform`, and the share of the padded overhead the mixed batch pays
(`(mixed - uniform) / (padded - uniform)`): near 1/8 when only the r=high rows pay for it.

    python benchmarks/mixed_ranks.py --json mixed_ranks.json
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    core_llama_config,
    interleaved_rounds,
    machine_info,
    machine_line,
    markdown_table,
    median,
    per_round_ratio,
    time_call,
    write_json,
)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(ranks: list[int], base: torch.nn.Module) -> Any:
    """A copy of the core model with one LoRA adapter per entry of `ranks` (random, non-zero)."""
    import tilpass

    model = copy.deepcopy(base).eval()
    adapted = None
    for i, rank in enumerate(ranks):
        config = tilpass.LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=False
        )
        torch.manual_seed(i)
        if adapted is None:
            adapted = tilpass.get_peft_model(model, config, f"a{i}")
        else:
            adapted.add_adapter(f"a{i}", config)
    return adapted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--low", type=int, default=8)
    parser.add_argument("--high", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(core_llama_config())
    low, high = args.low, args.high
    models = {
        "uniform": build([low] * 8, base),
        "mixed": build([low] * 7 + [high], base),
        "padded": build([high] * 8, base),
    }
    names = [f"a{i}" for i in range(8)]
    results: dict[str, Any] = {
        "command": " ".join(["python benchmarks/mixed_ranks.py", *sys.argv[1:]])
    }
    rows = []
    for batch, length in ((64, 1), (16, 32)):
        ids = torch.randint(0, 32000, (batch, length), generator=torch.Generator().manual_seed(1))
        mix = [names[i % 8] for i in range(batch)]

        def run(model: Any, ids: torch.Tensor = ids, mix: list[str] = mix) -> torch.Tensor:
            return model(input_ids=ids, adapter_names=mix).logits

        timers = {k: (lambda m=m: time_call(lambda: run(m), args.reps)) for k, m in models.items()}
        samples = interleaved_rounds(timers, args.rounds)
        mixed_r = per_round_ratio(samples["mixed"], samples["uniform"])
        padded_r = per_round_ratio(samples["padded"], samples["uniform"])
        share = [
            (m - u) / max(p - u, 1e-12)
            for m, u, p in zip(samples["mixed"], samples["uniform"], samples["padded"], strict=True)
        ]
        label = f"{batch}x{length}"
        results[label] = {
            "median_ms": {k: 1e3 * median(v) for k, v in samples.items()},
            "mixed/uniform": str(mixed_r),
            "padded/uniform": str(padded_r),
            "share_of_padded_overhead": median(share),
        }
        rows.append(
            [
                label,
                f"{1e3 * median(samples['uniform']):.1f}",
                f"{1e3 * median(samples['mixed']):.1f}",
                f"{1e3 * median(samples['padded']):.1f}",
                str(mixed_r),
                str(padded_r),
                f"{median(share):.2f}",
            ]
        )
        print(f"[{time.strftime('%H:%M:%S')}] {label} done", file=sys.stderr, flush=True)
    info = machine_info()
    results["machine"] = info
    print(machine_line(info))
    headers = [
        "batch",
        f"uniform r={low} ms",
        f"mixed 7x r={low} + 1x r={high} ms",
        f"padded r={high} ms",
        "mixed/uniform",
        "padded/uniform",
        "share of padded overhead",
    ]
    print(markdown_table(headers, rows))
    if args.json:
        write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
