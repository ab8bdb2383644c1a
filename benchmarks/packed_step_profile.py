"""Where the CPU time of one packed training step goes: tilpass against a padding-free PEFT step.

The default model (SmolLM2-135M-Instruct), LoRA r=8 on q_proj and v_proj (B non-zero), fp32,
one step (forward, backward, AdamW) over the same ``--batch`` ragged examples (lengths uniform
in 20-``--ragged-max``, loss on each example's second half), in three layouts:

- ``flat``: tilpass's packed step on an ``sdpa`` model: one padding-free row, attention once
  per example (``tilpass.packed_attention``), the LM head only on loss positions;
- ``rows``: the same examples in rows of ``--max-length`` tokens, attention from transformers'
  block-diagonal mask (what tilpass does on models without ``sdpa``);
- ``peft``: what TRL's padding-free packed step computes: a PEFT model on one flat row with
  position ids (transformers builds one ``T x T`` block-diagonal mask), the model's own loss
  over full logits.

Each layout runs once untimed, then once under ``torch.profiler`` (CPU); the script prints the
step's CPU time by phase and the operators that take most of it. Run it with one thread
(``OMP_NUM_THREADS=1``) for CPU times that a loaded machine does not inflate::

    OMP_NUM_THREADS=1 python benchmarks/packed_step_profile.py --batch 8 --ragged-max 1000
"""

from __future__ import annotations

import argparse
import random
import time
from collections import defaultdict
from typing import Any

import torch

LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
# Operator name fragments -> the part of the step they belong to.
KINDS = (
    ("attention", ("scaled_dot_product", "flash_attention", "_efficient_attention", "softmax")),
    ("mask", ("masking_utils", "where", "logical_", "eq", "ne", "cumsum", "diff")),
    ("loss", ("cross_entropy", "log_softmax", "nll_loss", "LinearCrossEntropy", "logsumexp")),
    ("optimizer", ("adam", "_foreach", "clip_grad")),
    ("matmul", ("addmm", "aten::mm", "bmm", "linear", "matmul")),
)


def ragged(n: int, high: int, vocab: int, seed: int = 0) -> list[dict[str, list[int]]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(20, high)
        ids = [rng.randrange(10, vocab) for _ in range(length)]
        out.append({"input_ids": ids, "labels": [-100] * (length // 2) + ids[length // 2 :]})
    return out


def tilpass_step(model: Any, batches: list[dict[str, torch.Tensor]], opt: Any) -> None:
    from tilpass.losses import causal_lm_loss

    n_tok = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    for b in batches:
        with torch.profiler.record_function("forward"):
            loss, _ = causal_lm_loss(model, b)
        with torch.profiler.record_function("backward"):
            (loss / n_tok).backward()
    with torch.profiler.record_function("optimizer"):
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)


def peft_step(model: Any, batch: dict[str, torch.Tensor], opt: Any) -> None:
    with torch.profiler.record_function("forward"):
        ids, pos = batch["input_ids"], batch["position_ids"]
        out = model(input_ids=ids, position_ids=pos, labels=batch["labels"], use_cache=False)
    with torch.profiler.record_function("backward"):
        out.loss.backward()
    with torch.profiler.record_function("optimizer"):
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)


def nonzero_b(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)


def build(layout: str, model_dir: str, examples: list[dict], max_length: int) -> Any:
    """(model, step function) for one layout."""
    from transformers import AutoModelForCausalLM

    from tilpass.data.packing import collate_packed, pack_rows

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    flat = collate_packed([examples], 0)
    if layout == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(base, LoraConfig(**LORA))
        nonzero_b(model)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
        return model, lambda: peft_step(model, flat, opt)
    from tilpass import LoraConfig as TilpassLora
    from tilpass import get_peft_model as tilpass_peft
    from tilpass.packed_attention import PackedAttention

    model = tilpass_peft(base, TilpassLora(**LORA))
    nonzero_b(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    if layout == "flat":
        attention = PackedAttention.for_model(model)
        assert attention.enabled, "the model does not qualify for per-example attention"

        def run() -> None:
            with attention.active():
                tilpass_step(model, [flat], opt)

        return model, run
    rows = pack_rows([len(ex["input_ids"]) for ex in examples], max_length)
    batch = collate_packed([[examples[i] for i in row] for row in rows], 0)
    return model, lambda: tilpass_step(model, [batch], opt)


def kind_of(name: str) -> str:
    for kind, parts in KINDS:
        if any(p in name for p in parts):
            return kind
    return "other"


def profile(layout: str, model_dir: str, examples: list[dict], max_length: int, top: int) -> None:
    model, step = build(layout, model_dir, examples, max_length)
    model.train()
    step()  # warm-up: first-call allocations and dispatch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cpu0, wall0 = time.process_time(), time.perf_counter()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    events = prof.key_averages()
    wanted = ("forward", "backward", "optimizer")
    phases = {e.key: e.cpu_time_total / 1e6 for e in events if e.key in wanted}
    kinds: dict[str, float] = defaultdict(float)
    for e in events:
        if e.key.startswith("aten::") or e.key.startswith("LinearCrossEntropy"):
            kinds[kind_of(e.key)] += e.self_cpu_time_total / 1e6
    print(f"\n== {layout}: step {cpu:.2f} CPU s ({wall:.2f} s wall, profiled)")
    print("   phases (s): " + ", ".join(f"{k} {v:.2f}" for k, v in phases.items()))
    ranked = sorted(kinds.items(), key=lambda kv: -kv[1])
    print("   self time by kind (s): " + ", ".join(f"{k} {v:.2f}" for k, v in ranked))
    print(events.table(sort_by="self_cpu_time_total", row_limit=top))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="local model directory (default model)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--ragged-max", type=int, default=1000)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--layouts", default="flat,rows,peft")
    p.add_argument("--top", type=int, default=15, help="operators listed per layout")
    args = p.parse_args()
    from transformers import AutoConfig

    from tilpass.pretrained import DEFAULT_MODEL, resolve_model_path

    model_dir = args.model or str(resolve_model_path(DEFAULT_MODEL))
    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    examples = ragged(args.batch, args.ragged_max, vocab)
    lengths = [len(ex["input_ids"]) for ex in examples]
    print(f"examples: {lengths} ({sum(lengths)} tokens), threads {torch.get_num_threads()}")
    for layout in args.layouts.split(","):
        profile(layout, model_dir, examples, args.max_length, args.top)


if __name__ == "__main__":
    main()
