"""Training-step benchmark: tilpass LoRA against PEFT LoRA, full fine-tuning and
gradient checkpointing with the same loop step; also the selective LM head and padding trimming.

One step is the step of `tilpass.train.train` built from tilpass's own functions (no logging,
eval or checkpointing): `trim_padding`, one `tilpass.evaluate.causal_lm_loss` forward (selective
LM head) normalised by the loss-token count, backward, `clip_grad_norm_(1.0)`, AdamW step (the
loop's two parameter groups and defaults), LR-scheduler step, `zero_grad(set_to_none=True)`,
in a process where glibc keeps freed memory for reuse, as `train()` sets it on CPU.
Batch 4 x 128 tokens, fp32, `torch.set_num_threads(2)`; LoRA r=16, alpha 32 on q_proj, v_proj
(the same config in both libraries, the same non-zero adapter values).

Time: every variant lives in one process and is timed in interleaved rounds (order rotating);
a comparison is the median of per-round ratios. Memory: a fresh subprocess per variant builds
the model, optimizer and batch, resets the kernel's peak-RSS mark (`/proc/self/clear_refs` 5)
and runs a few steps; growth = `ru_maxrss` after minus RSS before the steps; median of several
processes.

    python benchmarks/train_step.py --json train_step.json   # both models (~10 min)
    python benchmarks/train_step.py --quick                  # smoke run, core model
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import (
    Gate,
    core_llama_config,
    interleaved_rounds,
    machine_info,
    machine_line,
    markdown_table,
    median,
    per_round_ratio,
    rel_error,
    timer,
    write_json,
)

BATCH, LENGTH, RANK, ALPHA = 4, 128, 16, 32
TARGETS = ["q_proj", "v_proj"]
ANSWER_FRACTION = 0.25  # selective-head case: loss on the last quarter of each row
PADDED_LENGTH = 256  # padding case: rows of 128/112/96/80 tokens collated to 256 columns
ROW_LENGTHS = (128, 112, 96, 80)
STEP_VARIANTS = ("tilpass", "peft", "full", "tilpass_gc", "floor")
# memory cases: (model variant, batch kind, selective head)
MEM_CASES: dict[str, tuple[str, str, bool]] = {
    "tilpass": ("tilpass", "full", True),
    "peft": ("peft", "full", True),
    "full": ("full", "full", True),
    "tilpass_gc": ("tilpass_gc", "full", True),
    "answers_selective": ("tilpass", "answers", True),
    "answers_full_logits": ("tilpass", "answers", False),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- models and batches
def build_base(model_name: str, fast_init: bool = False) -> nn.Module:
    """The core benchmark's random Llama (seed 0), or the real default model (SmolLM2-135M).

    `fast_init` (memory children only, where values do not matter): allocate on the meta device
    and fill N(0, 0.02) once, instead of transformers' slower double initialisation."""
    if model_name == "smollm2":
        from tilpass.pretrained import load_model

        model = load_model()[0]
        with torch.no_grad():  # own the weights (not pages of the mmapped file); ties survive
            for p in model.parameters():
                p.data = p.data.clone()
        return model.train()
    from transformers import LlamaForCausalLM

    config = core_llama_config()
    torch.manual_seed(0)
    if not fast_init:
        return LlamaForCausalLM(config).train()
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02) if p.ndim >= 2 else p.fill_(1.0)
    # the rotary buffers were not parameters: rebuild them
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    return model.train()


def make_variant(base: nn.Module, variant: str, copy_base: bool = True) -> nn.Module:
    """Wrap (a copy of) `base` for one variant; LoRA A and B are non-zero and equal in both
    libraries (drawn in the order of the shared PEFT file keys)."""
    model = copy.deepcopy(base) if copy_base else base
    if variant == "floor":
        # What any LoRA step costs at least: every weight frozen except layer 0's first norm,
        # so backward still runs through every layer for input gradients (as LoRA needs),
        # with no adapter matmuls at all.
        for name, p in model.named_parameters():
            p.requires_grad_(name.endswith("layers.0.input_layernorm.weight"))
        return model.train()
    if variant == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model.train()
    if variant == "peft":
        import peft

        wrapped: Any = peft.get_peft_model(
            model, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS)
        )
        tensors = peft.get_peft_model_state_dict(wrapped)
    else:
        import tilpass
        from tilpass.train import enable_gradient_checkpointing

        wrapped = tilpass.get_peft_model(
            model, tilpass.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS)
        )
        if variant == "tilpass_gc":
            enable_gradient_checkpointing(wrapped)
        tensors = wrapped.adapter_state_dict("default")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for key in sorted(tensors):
            t = tensors[key]
            t.copy_(torch.randn(t.shape, generator=gen) * (0.01 if "lora_B" in key else 0.03))
    return wrapped.train()


def make_batch(vocab: int, kind: str = "full") -> dict[str, torch.Tensor]:
    """`full`: 4 x 128, loss on every token; `answers`: loss on the last 25% of each row;
    `padded`: rows of 128/112/96/80 tokens right-padded to 256 columns (no loss on padding)."""
    gen = torch.Generator().manual_seed(2)
    width = PADDED_LENGTH if kind == "padded" else LENGTH
    ids = torch.randint(3, vocab, (BATCH, width), generator=gen)
    mask = torch.ones_like(ids)
    if kind == "padded":
        for row, n in enumerate(ROW_LENGTHS):
            ids[row, n:] = 0
            mask[row, n:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    if kind == "answers":
        labels[:, : int(LENGTH * (1 - ANSWER_FRACTION))] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class Stepper:
    """One optimizer step of tilpass's training loop (`train()`'s inner step) on a fixed batch."""

    def __init__(
        self,
        model: nn.Module,
        batch: dict[str, torch.Tensor],
        selective: bool = True,
        trim: bool = True,
    ) -> None:
        from tilpass.train import TrainConfig, lr_factor

        self.model, self.batch, self.selective, self.trim = model, batch, selective, trim
        cfg = TrainConfig()
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        groups = [
            {"params": [p for _, p in named if p.ndim >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for _, p in named if p.ndim < 2], "weight_decay": 0.0},
        ]
        self.opt = torch.optim.AdamW(
            [g for g in groups if g["params"]],
            lr=cfg.learning_rate,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_epsilon,
        )
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: lr_factor(s, 10**6, 0, cfg.lr_scheduler)
        )

    def loss(self) -> torch.Tensor:
        """Mean loss per loss token (the quantity whose gradient the loop applies)."""
        from tilpass.losses import causal_lm_loss, count_loss_tokens, trim_padding

        batch = trim_padding(self.batch) if self.trim else self.batch
        total, _ = causal_lm_loss(self.model, batch, self.selective)
        return total / max(count_loss_tokens(batch), 1)

    def __call__(self) -> None:
        self.loss().backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)


def grads_of(stepper: Stepper) -> torch.Tensor:
    """The flattened gradient of one backward (no optimizer step), then cleared."""
    stepper.loss().backward()
    flat = torch.cat([p.grad.flatten() for p in stepper.params if p.grad is not None])
    stepper.opt.zero_grad(set_to_none=True)
    return flat


# -- memory, one fresh process per measurement
def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def hwm_mb() -> float:
    """VmHWM: the peak RSS of this process's memory map, which `clear_refs` 5 resets. Unlike
    `ru_maxrss` it does not keep the peak recorded when a helper thread exited."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return maxrss_mb()


def child(model_name: str, case: str, steps: int) -> dict[str, Any]:
    """Peak RSS growth of `steps` steps of one case, in this (fresh) process."""
    torch.set_num_threads(2)
    variant, kind, selective = MEM_CASES[case]
    model = make_variant(build_base(model_name, fast_init=True), variant, copy_base=False)
    stepper = Stepper(model, make_batch(model.config.vocab_size, kind), selective)
    gc.collect()
    try:  # forget the construction peak (Linux >= 4.0); ru_maxrss follows the reset mark
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    before = rss_mb()
    for _ in range(steps):
        stepper()
    peak, maxrss = hwm_mb(), maxrss_mb()
    return {
        "rss_before_mb": before,
        "peak_mb": peak,
        "growth_mb": peak - before,
        "maxrss_growth_mb": maxrss - before,
        "tensor_peak_mb": tensor_peak_mb(stepper),
        "reset": reset,
    }


def tensor_peak_mb(stepper: Stepper) -> float:
    """Peak of live tensor bytes allocated during one more step, from the profiler's
    allocation events: deterministic, unlike RSS, which also holds allocator and thread
    memory (measured after the RSS figures, which the profiler would disturb)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        stepper()
    # Each op event carries the bytes it allocated net of what it freed ("self"); frees
    # outside any op are "[memory]" events. Replayed in start order, their running sum is
    # the live-tensor curve of the step (to op granularity).
    deltas = sorted(
        (e.time_range.start, e.self_cpu_memory_usage)
        for e in prof.events()
        if e.self_cpu_memory_usage
    )
    live = top = 0
    for _, delta in deltas:
        live += delta
        top = max(top, live)
    return top / 2**20


def memory(model_name: str, case: str, procs: int, steps: int) -> dict[str, Any]:
    runs = []
    for _ in range(procs):
        cmd = [sys.executable, __file__, "--child", case, "--model", model_name]
        out = subprocess.run(
            [*cmd, "--child-steps", str(steps)], capture_output=True, text=True, check=True
        )
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    result: dict[str, Any] = {
        k: median([r[k] for r in runs])
        for k in ("rss_before_mb", "peak_mb", "growth_mb", "maxrss_growth_mb", "tensor_peak_mb")
    }
    result["growth_runs_mb"] = [round(r["growth_mb"], 1) for r in runs]
    result["reset"] = all(r["reset"] for r in runs)
    return result


# -- the benchmark
def checked(what: str, err: float, limit: float = 1e-4) -> float:
    log(f"check {what}: rel err {err:.2e}")
    if not err < limit:
        raise AssertionError(f"{what}: rel err {err:.2e} > {limit:g}")
    return err


def bench(
    model_name: str, rounds: int, extra_rounds: int, procs: int, steps: int
) -> dict[str, Any]:
    t0 = time.perf_counter()
    torch.set_num_threads(2)
    base = build_base(model_name)
    vocab = base.config.vocab_size
    batches = {k: make_batch(vocab, k) for k in ("full", "answers", "padded")}
    models = {v: make_variant(base, v) for v in STEP_VARIANTS}
    steps_ = {v: Stepper(m, batches["full"]) for v, m in models.items()}
    lora = models["tilpass"]
    extra: dict[str, Stepper] = {
        "answers_selective": Stepper(lora, batches["answers"], selective=True),
        "answers_full_logits": Stepper(lora, batches["answers"], selective=False),
        "padded_trimmed": Stepper(lora, batches["padded"], trim=True),
        "padded_untrimmed": Stepper(lora, batches["padded"], trim=False),
    }
    from tilpass.losses import selective_loss_matches

    checks = {
        "loss tilpass vs peft": rel_error(steps_["tilpass"].loss(), steps_["peft"].loss()),
        "grads tilpass vs peft": rel_error(grads_of(steps_["tilpass"]), grads_of(steps_["peft"])),
        "loss checkpointing vs not": rel_error(
            steps_["tilpass_gc"].loss(), steps_["tilpass"].loss()
        ),
        "grads checkpointing vs not": rel_error(
            grads_of(steps_["tilpass_gc"]), grads_of(steps_["tilpass"])
        ),
        "loss full FT vs tilpass LoRA with B=0 (base)": 0.0,
        "loss selective vs full logits (25% answers)": rel_error(
            extra["answers_selective"].loss(), extra["answers_full_logits"].loss()
        ),
        "loss trimmed vs padded": rel_error(
            extra["padded_trimmed"].loss(), extra["padded_untrimmed"].loss()
        ),
    }
    with lora.disable_adapter():
        checks["loss full FT vs tilpass LoRA with B=0 (base)"] = rel_error(
            steps_["tilpass"].loss(), steps_["full"].loss()
        )
    for what, err in checks.items():
        checked(f"{model_name}: {what}", err)
    assert selective_loss_matches(lora, batches["full"]), "selective head disagrees"

    def progress(label: str) -> Callable[[str], None]:
        return lambda m: log(f"{model_name} {label} {m}")

    log(f"{model_name}: timing {len(STEP_VARIANTS)} step variants x {rounds} rounds")
    samples = interleaved_rounds(
        {v: timer(s) for v, s in steps_.items()}, rounds, 1, progress("step")
    )
    head = interleaved_rounds(
        {k: timer(extra[k]) for k in ("answers_selective", "answers_full_logits")},
        extra_rounds,
        1,
        progress("head"),
    )
    pad = interleaved_rounds(
        {k: timer(extra[k]) for k in ("padded_trimmed", "padded_untrimmed")},
        extra_rounds,
        1,
        progress("padding"),
    )
    samples |= head | pad
    params = sum(p.numel() for p in base.parameters())
    trainable = {v: sum(p.numel() for p in s.params) for v, s in steps_.items()}
    del models, steps_, extra, lora, base
    gc.collect()
    log(f"{model_name}: memory, {len(MEM_CASES)} cases x {procs} processes x {steps} steps")
    mem = {case: memory(model_name, case, procs, steps) for case in MEM_CASES}
    ms = {v: 1000 * median(s) for v, s in samples.items()}
    tokens = {v: BATCH * LENGTH for v in ms}  # the padded batch has 416 real tokens
    tokens["padded_trimmed"] = tokens["padded_untrimmed"] = sum(ROW_LENGTHS)
    pairs = {
        "tilpass/peft": ("tilpass", "peft"),
        "tilpass/full": ("tilpass", "full"),
        "floor/peft": ("floor", "peft"),
        "tilpass/floor": ("tilpass", "floor"),
        "floor/full": ("floor", "full"),
        "gc/no_gc": ("tilpass_gc", "tilpass"),
        "selective/full_logits": ("answers_selective", "answers_full_logits"),
        "trimmed/padded": ("padded_trimmed", "padded_untrimmed"),
    }
    return {
        "model": model_name,
        "params": params,
        "trainable": trainable,
        "ms": ms,
        "tokens_per_s": {v: tokens[v] / (t / 1000) for v, t in ms.items()},
        "ratios": {k: per_round_ratio(samples[a], samples[b]) for k, (a, b) in pairs.items()},
        "samples_s": samples,
        "memory": mem,
        "checks": checks,
        "rounds": rounds,
        "extra_rounds": extra_rounds,
        "procs": procs,
        "mem_steps": steps,
        "wall_s": time.perf_counter() - t0,
    }


def growth_ratio(r: dict[str, Any], a: str, b: str) -> float:
    return r["memory"][a]["growth_mb"] / r["memory"][b]["growth_mb"]


def gates(r: dict[str, Any]) -> list[Gate]:
    t, ra, m = r["model"], r["ratios"], r["memory"]
    return [
        Gate(
            f"{t} step tilpass/PEFT", ra["tilpass/peft"].median, 0.95, "<=", str(ra["tilpass/peft"])
        ),
        Gate(
            f"{t} peak RSS growth tilpass/PEFT",
            growth_ratio(r, "tilpass", "peft"),
            1.0,
            "<=",
            f"{m['tilpass']['growth_mb']:.0f} vs {m['peft']['growth_mb']:.0f} MB",
        ),
        Gate(
            f"{t} step tilpass LoRA/full fine-tuning",
            ra["tilpass/full"].median,
            0.55,
            "<=",
            str(ra["tilpass/full"]),
        ),
        Gate(
            f"{t} step checkpointing/without",
            ra["gc/no_gc"].median,
            1.45,
            "<=",
            str(ra["gc/no_gc"]),
        ),
        Gate(
            f"{t} peak RSS growth checkpointing/without",
            growth_ratio(r, "tilpass_gc", "tilpass"),
            0.80,
            "<=",
            f"{m['tilpass_gc']['growth_mb']:.0f} vs {m['tilpass']['growth_mb']:.0f} MB",
        ),
    ]


def report(r: dict[str, Any]) -> str:
    m = r["memory"]
    labels = {
        "tilpass": "tilpass LoRA",
        "peft": "PEFT LoRA",
        "full": "full fine-tuning",
        "tilpass_gc": "tilpass LoRA + checkpointing",
        "floor": "floor: frozen base, no adapter (bound)",
        "answers_selective": "tilpass LoRA, 25% loss tokens, selective head",
        "answers_full_logits": "tilpass LoRA, 25% loss tokens, full logits",
        "padded_trimmed": "tilpass LoRA, padded to 256, trimmed",
        "padded_untrimmed": "tilpass LoRA, padded to 256, not trimmed",
    }
    rows = []
    for v, label in labels.items():
        mem = m.get(v)
        rows.append(
            [
                label,
                f"{r['trainable'].get(v, r['trainable']['tilpass']) / 1e6:.2f}M",
                f"{r['ms'][v]:.0f}",
                f"{r['tokens_per_s'][v]:.0f}",
                f"{mem['growth_mb']:.0f}" if mem else "-",
                f"{mem['peak_mb']:.0f}" if mem else "-",
                f"{mem['tensor_peak_mb']:.0f}" if mem else "-",
            ]
        )
    table = markdown_table(
        [
            "variant",
            "trainable",
            "step ms",
            "tokens/s",
            "peak RSS growth MB",
            "peak RSS MB",
            "tensor peak MB",
        ],
        rows,
    )
    lines = [f"- {k}: {v}" for k, v in r["ratios"].items()]
    lines.append(
        f"- peak RSS growth full FT / tilpass LoRA: {growth_ratio(r, 'full', 'tilpass'):.2f}x; "
        f"whole-process peak RSS full FT / tilpass LoRA: "
        f"{m['full']['peak_mb'] / m['tilpass']['peak_mb']:.2f}x"
    )
    lines.append(
        f"- tensor peak (live tensor bytes allocated in one step, profiler) tilpass / PEFT: "
        f"{m['tilpass']['tensor_peak_mb']:.0f} / {m['peft']['tensor_peak_mb']:.0f} MB"
    )
    lines.append(
        f"- peak RSS growth selective / full logits (25% loss tokens): "
        f"{growth_ratio(r, 'answers_selective', 'answers_full_logits'):.2f}"
    )
    checks = "; ".join(f"{k} {v:.1e}" for k, v in r["checks"].items())
    return (
        f"{r['model']} ({r['params'] / 1e6:.1f}M params), batch {BATCH}x{LENGTH}, LoRA r={RANK} "
        f"alpha={ALPHA} on {', '.join(TARGETS)}; {r['rounds']} rounds ({r['extra_rounds']} for the "
        f"head and padding cases), memory median of "
        f"{r['procs']} processes x {r['mem_steps']} steps; {r['wall_s']:.0f} s\n\n{table}\n\n"
        + "\n".join(lines)
        + f"\n- checks (rel err): {checks}\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="timing rounds, step variants")
    parser.add_argument(
        "--extra-rounds", type=int, default=5, help="timing rounds, selective head and padding"
    )
    parser.add_argument("--procs", type=int, default=3, help="processes per memory figure")
    parser.add_argument("--mem-steps", type=int, default=2, help="steps per memory process")
    parser.add_argument("--quick", action="store_true", help="2 rounds, 1 process, core model")
    parser.add_argument("--json", default=None, help="write results here")
    parser.add_argument("--model", choices=("core", "smollm2"), help="default: both")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-steps", type=int, default=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    # As the tilpass command does on CPU (tilpass.runtime), for every variant alike.
    from tilpass.runtime import keep_freed_memory

    keep_freed_memory()
    if args.child:
        print(json.dumps(child(args.model or "core", args.child, args.child_steps)))
        return
    torch.set_num_threads(2)
    rounds, extra, procs = (2, 2, 1) if args.quick else (args.rounds, args.extra_rounds, args.procs)
    names = [args.model] if args.model else (["core"] if args.quick else ["core", "smollm2"])
    info = machine_info(("torch", "transformers", "peft", "tilpass"))
    results = [bench(name, rounds, extra, procs, args.mem_steps) for name in names]
    info["load_average_end"] = machine_info()["load_average"]
    print(f"command: python benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:])}")
    print(f"machine: {machine_line(info)}; load avg at end {info['load_average_end'][0]:.1f}\n")
    all_gates = []
    for r in results:
        print(report(r))
        all_gates += gates(r)
    print("gates")
    for g in all_gates:
        print(g.line())
    print(f"{sum(g.passed for g in all_gates)}/{len(all_gates)} gates pass")
    if args.json:
        write_json(
            args.json,
            {"machine": info, "results": results, "gates": [g.__dict__ for g in all_gates]},
        )


if __name__ == "__main__":
    main()
