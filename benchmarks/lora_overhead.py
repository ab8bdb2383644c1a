"""Where an unmerged LoRA adapter's forward cost goes, on one set of weight tensors.

The base model, the tilpass model (LoRA r=16, alpha 32 on q,k,v,o,gate,up,down, non-zero B)
and the merged model all read the same weight tensors, as in the core benchmark
(bench_lora.py); this one adds the wrapper-only variant, times single calls over many rounds
and gives each ratio a bootstrap interval. "merged" is the plain base model timed while the
adapter is merged into those tensors in place (`merge_adapter` before, `unmerge_adapter`
after, both untimed); "wrapper" is the tilpass model under `disable_adapter()`, which runs
every wrapper but no rank-r product.
Rounds alternate their phase order (unmerged phase first, then merged, or the reverse) and
rotate the order within a phase; each ratio is the median of per-round ratios, with a
bootstrap 95% interval of that median.

Before timing, merged logits must equal unmerged ones within 1e-4 (relative to the largest
logit); after timing, the unmerged logits must equal the first ones within 1e-5 (the repeated
merge / unmerge has not drifted the weights).

    python benchmarks/lora_overhead.py --shapes 16x1 64x1 --rounds 100
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    Phase,
    core_llama_config,
    machine_info,
    machine_line,
    phased_rounds,
    rel_error,
    shared_copy,
    timer,
)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build() -> tuple[torch.nn.Module, torch.nn.Module]:
    """(base model, tilpass model over the same weight tensors with a non-zero adapter)."""
    from transformers import LlamaForCausalLM

    import tilpass

    torch.manual_seed(0)
    base = LlamaForCausalLM(core_llama_config()).eval()
    config = tilpass.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS)
    model = tilpass.get_peft_model(shared_copy(base), config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # B starts at zero: make the adapter change the output
                param.copy_(torch.randn(param.shape, generator=gen) * 0.01)
    return base, model.eval()


class Overhead:
    """The four forwards of one input shape, in two phases per round (`common.Phase`)."""

    def __init__(self, base: torch.nn.Module, model: torch.nn.Module, ids: torch.Tensor) -> None:
        self.base, self.model, self.ids = base, model, ids
        self.seconds: dict[str, list[float]] = {}

    def logits(self, model: torch.nn.Module) -> torch.Tensor:
        with torch.inference_mode():
            return model(input_ids=self.ids).logits

    def wrapper(self) -> torch.Tensor:
        with self.model.disable_adapter():
            return self.logits(self.model)

    def phases(self) -> list[Phase]:
        unmerged = {
            "unmerged": timer(lambda: self.logits(self.model)),
            "wrapper": timer(self.wrapper),
            "base": timer(lambda: self.logits(self.base)),
        }
        merged = {"merged": timer(lambda: self.logits(self.base))}
        return [
            Phase(unmerged),
            Phase(merged, enter=self.model.merge_adapter, leave=self.model.unmerge_adapter),
        ]

    def check_merged(self) -> torch.Tensor:
        """The unmerged logits, after checking the merged model gives the same."""
        unmerged = self.logits(self.model)
        self.model.merge_adapter()
        try:
            merged = self.logits(self.base)
        finally:
            self.model.unmerge_adapter()
        if rel_error(merged, self.logits(self.base)) < 1e-3:
            raise SystemExit("the adapter does not change the logits: nothing would be measured")
        error = rel_error(merged, unmerged)
        if error > 1e-4:
            raise SystemExit(f"merged and unmerged logits differ by {error:.2e}")
        return unmerged

    def run(self, rounds: int) -> None:
        first = self.check_merged()
        self.seconds = phased_rounds(self.phases(), rounds, warmup=1)
        drift = rel_error(self.logits(self.model), first)
        if drift > 1e-5:
            raise SystemExit(f"merge / unmerge drifted the weights: logits moved by {drift:.2e}")


def ratio_line(label: str, num: list[float], den: list[float]) -> str:
    """Median per-round ratio with a bootstrap 95% interval of the median."""
    values = [a / b for a, b in zip(num, den, strict=True)]
    rng = random.Random(0)
    meds = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(2000))
    return (
        f"{label:18s} {statistics.median(values):.3f}  "
        f"(95% interval of the median {meds[50]:.3f}-{meds[1949]:.3f}, {len(values)} rounds)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shapes", nargs="+", default=["16x1", "64x1"], help="BATCHxLENGTH")
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    base, model = build()
    print(machine_line(machine_info()))
    for shape in args.shapes:
        batch, length = (int(v) for v in shape.split("x"))
        ids = torch.randint(0, 32000, (batch, length), generator=torch.Generator().manual_seed(2))
        bench = Overhead(base, model, ids)
        bench.run(args.rounds)
        s = bench.seconds
        ms = {k: f"{1e3 * statistics.median(v):.1f}" for k, v in s.items()}
        print(f"\n{shape}: median ms {ms}")
        print(ratio_line("unmerged / merged", s["unmerged"], s["merged"]))
        print(ratio_line("merged / base", s["merged"], s["base"]))
        print(ratio_line("wrapper / base", s["wrapper"], s["base"]))
        print(ratio_line("unmerged / wrapper", s["unmerged"], s["wrapper"]))


if __name__ == "__main__":
    main()
