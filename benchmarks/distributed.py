"""Data-parallel benchmark: 1 vs 2 processes, samples/s and the share of time communicating.

Each configuration runs under PyTorch's own launcher (``torch.distributed.run --standalone``),
gloo on CPU or NCCL on GPUs, one thread per rank on CPU. Every rank trains LoRA (r=16, alpha 32,
q_proj and v_proj) with tilpass's `DataParallel` (DDP over the loss, as `tilpass train` runs
it) on random token batches of ``--batch`` rows x ``--length`` tokens per rank: weak scaling,
so 2 ranks train twice the samples per step.

Per configuration it reports:

- samples/s over all ranks (median step time over the timed steps);
- communication share: 1 - (median step time with DDP's ``no_sync``, i.e. no gradient
  reduction) / (median step time with it), the time the step spends on communication that
  the backward pass does not hide;
- the all-reduce time of one flat tensor the size of the adapter's gradients, measured alone,
  and its share of the step time (an upper bound of what DDP spends reducing, as DDP
  overlaps the reduction with the backward pass);
- bytes reduced per step: the adapter's gradients (what travels) beside the whole model's
  parameters (what full fine-tuning with DDP would reduce).

    python benchmarks/distributed.py                      # default model, 1 and 2 processes
    python benchmarks/distributed.py --quick              # short mode: 2 warm-up + 4 timed steps
    python benchmarks/distributed.py --model tiny --quick # smoke run on a tiny random Llama
    python benchmarks/distributed.py --render out.json    # the table of saved results
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_info, machine_line, markdown_table, write_json

RANK, ALPHA, TARGETS = 16, 32, ["q_proj", "v_proj"]


def build_model(name: str) -> torch.nn.Module:
    """The default model (from the local cache) or a tiny random Llama, with LoRA on it."""
    import tilpass

    if name == "tiny":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=256,
        )
        base = LlamaForCausalLM(config)
    else:
        from tilpass.pretrained import load_model

        base, _ = load_model(name)
    lora = tilpass.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS)
    return tilpass.get_peft_model(base, lora)


def timed_steps(dp: Any, loss_fn: Any, batch: dict, steps: int, sync: bool) -> list[float]:
    """Forward + backward + AdamW step, ``steps`` times; seconds per step."""
    params = [p for p in loss_fn.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    times = []
    for _ in range(steps):
        dp.barrier()
        start = time.perf_counter()
        with dp.sync(last=sync):
            loss, n = loss_fn(batch, True)
            (loss / max(n, 1)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times


def allreduce_seconds(dp: Any, numel: int, repeats: int) -> float:
    """Median time of one all-reduce of a float32 tensor of ``numel`` elements."""
    import torch.distributed as dist

    if dp.size == 1:
        return 0.0
    flat = torch.zeros(numel, device=dp.comm_device())
    times = []
    for _ in range(repeats):
        dp.barrier()
        start = time.perf_counter()
        dist.all_reduce(flat)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def worker(args: argparse.Namespace) -> None:
    """One rank: train, time, and (rank 0) write the measurements to ``args.out``."""
    from tilpass.distributed import DataParallel, world_session

    with world_session("auto") as world:
        dp = DataParallel(world)
        model = build_model(args.model).to(world.device() or "cpu")
        loss_fn = dp.wrap(model)
        gen = torch.Generator().manual_seed(world.rank)
        vocab = int(model.config.vocab_size)
        ids = torch.randint(3, vocab, (args.batch, args.length), generator=gen)
        batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
        batch = {k: v.to(dp.comm_device()) for k, v in batch.items()}
        timed_steps(dp, loss_fn, batch, args.warmup, sync=True)
        with_sync = timed_steps(dp, loss_fn, batch, args.steps, sync=True)
        without = timed_steps(dp, loss_fn, batch, args.steps, sync=False)
        adapter = [p for p in model.parameters() if p.requires_grad]
        numel = sum(p.numel() for p in adapter)
        reduce_s = allreduce_seconds(dp, numel, args.steps)
        if world.is_main:
            step, alone = statistics.median(with_sync), statistics.median(without)
            result = {
                "ranks": dp.size,
                "backend": world.backend or "none (1 process)",
                "step_s": step,
                "step_no_sync_s": alone,
                "samples_per_s": args.batch * dp.size / step,
                "comm_share": max(0.0, 1.0 - alone / step) if dp.size > 1 else 0.0,
                "allreduce_adapter_s": reduce_s,
                "adapter_grad_bytes": sum(p.numel() * p.element_size() for p in adapter),
                "model_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            }
            Path(args.out).write_text(json.dumps(result))


def launch(nproc: int, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """This script as a worker on ``nproc`` ranks; rank 0's measurements."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc-per-node={nproc}", __file__, "--worker", "--out", str(out)]
    cmd += ["--model", args.model, "--batch", str(args.batch), "--length", str(args.length)]
    cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    subprocess.run(cmd, check=True, env=env)
    return json.loads(out.read_text())


def table(results: list[dict[str, Any]]) -> str:
    rows = [
        [
            r["ranks"],
            r["backend"],
            f"{r['samples_per_s']:.2f}",
            f"{1000 * r['step_s']:.0f}",
            f"{100 * r['comm_share']:.1f}%",
            f"{1000 * r['allreduce_adapter_s']:.2f}",
            f"{100 * r['allreduce_adapter_s'] / r['step_s']:.2f}%",
            f"{r['adapter_grad_bytes'] / 2**20:.2f} MiB",
            f"{r['model_bytes'] / 2**20:.1f} MiB",
        ]
        for r in results
    ]
    headers = [
        "ranks",
        "backend",
        "samples/s",
        "step ms",
        "comm share",
        "adapter all-reduce ms",
        "all-reduce / step",
        "adapter grads/step",
        "full model grads/step",
    ]
    return markdown_table(headers, rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="SmolLM2-135M-Instruct", help="model name, or tiny")
    p.add_argument("--batch", type=int, default=4, help="rows per rank")
    p.add_argument("--length", type=int, default=128, help="tokens per row")
    p.add_argument("--steps", type=int, default=20, help="timed steps (each mode)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--quick", action="store_true", help="short mode: 4 timed, 2 warm-up steps")
    p.add_argument("--json", default=None, help="write results and machine info here")
    p.add_argument("--render", default=None, help="print the table of a --json file and stop")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    if args.render:
        saved = json.loads(Path(args.render).read_text())
        print(machine_line(saved["machine"]))
        print(table(saved["results"]))
        return
    if args.quick:
        args.steps, args.warmup = 4, 2
    with tempfile.TemporaryDirectory(prefix="tilpass-dist-bench-") as tmp:
        results = [launch(n, args, Path(tmp) / f"r{n}.json") for n in (1, 2)]
    info = machine_info()
    print(machine_line(info))
    print(table(results))
    if args.json:
        write_json(args.json, {"machine": info, "args": vars(args), "results": results})


if __name__ == "__main__":
    main()
