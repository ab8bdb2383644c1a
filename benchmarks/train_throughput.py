"""Training throughput on ragged data: tilpass padded / grouped / packed against TRL.

The default model (SmolLM2-135M-Instruct), LoRA r=8 (alpha 16, no dropout) on q_proj and
v_proj, fp32 on the CPU. Two datasets, tokenized once here so every configuration trains on
the same examples: the shipped ``specialty_train.jsonl`` and a synthetic ragged set (lengths
drawn uniformly from 20-1,000 tokens, random ids, loss on the second half of each example).
Configurations, each in its own process, the same number of optimizer steps, batch size and
learning rate:

- ``tilpass_padded``, ``tilpass_grouped``, ``tilpass_packed``: ``tilpass.train.train`` with
  ``Batching(...)`` (packed rows of ``max_length`` tokens; a step holds ``batch`` examples);
- ``trl_padded``, ``trl_packed``: TRL's ``SFTTrainer`` + PEFT, ``packing=False`` / ``True``
  (a TRL packed step holds ``batch`` rows of ``max_length`` tokens). TRL is a benchmark-only
  dependency: its children run under ``--trl-python`` (a separate virtual environment).

Each child reports real (non-padding) tokens/s over the steps after the first, the padding
fraction (share of computed positions that were padding), peak RSS and the final training
loss. ``--shared`` adds the shared-machine case: ``tilpass_packed`` alone and beside one
single-threaded busy process, with the OpenMP default wait policy and with ``PASSIVE``.

    python benchmarks/train_throughput.py --trl-python /path/to/trl-venv/bin/python \\
        --steps 20 --batch 8 --shared --json train_throughput.json          # full run
    python benchmarks/train_throughput.py --quick --trl-python ...           # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TILPASS = ("tilpass_padded", "tilpass_grouped", "tilpass_packed")
TRL = ("trl_padded", "trl_packed")
SRC = Path(__file__).resolve().parents[1] / "src"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- data (parent process) ----------


def default_model_dir() -> str:
    """The default model's local directory (converted once into the tilpass cache)."""
    from tilpass.pretrained import DEFAULT_MODEL, resolve_model_path

    return str(resolve_model_path(DEFAULT_MODEL))


def shipped_examples(model_dir: str, max_length: int) -> list[dict[str, list[int]]]:
    """The shipped training set, tokenized and masked by tilpass."""
    from transformers import AutoTokenizer

    from tilpass.data import build_dataset

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    path = SRC / "tilpass" / "data" / "specialty_train.jsonl"
    return list(build_dataset(path, tokenizer, max_length=max_length).examples)


def ragged_examples(n: int, low: int, high: int, vocab: int, seed: int = 0) -> list[dict]:
    """Random token ids, lengths uniform in [low, high], loss on the second half."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(low, high)
        ids = [rng.randrange(10, vocab) for _ in range(length)]
        half = length // 2
        out.append({"input_ids": ids, "labels": [-100] * half + ids[half:]})
    return out


# -- children ----------


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def tilpass_child(args: argparse.Namespace, examples: list[dict]) -> dict[str, Any]:
    """Train with tilpass's loop; read steps, tokens and losses back from metrics.jsonl."""
    import torch
    from transformers import AutoModelForCausalLM

    from tilpass import LoraConfig, get_peft_model
    from tilpass.data.batching import TokenizedDataset, collate
    from tilpass.data.packing import Batching, BatchPlan
    from tilpass.data.sources import DataStats
    from tilpass.train import TrainConfig, train

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(model, lora)
    data = TokenizedDataset(examples, DataStats(path="benchmark"), pad_token_id=0)
    mode = args.child.removeprefix("tilpass_")
    batching = Batching(mode == "packed", mode == "grouped", args.max_length)
    config = TrainConfig(
        learning_rate=args.lr,
        batch_size=args.batch,
        max_steps=args.steps,
        logging_steps=1,
        progress_bar=False,
        save_total_limit=1,
        seed=0,
    )
    collate_fn = lambda b: collate(b, 0)  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="throughput-bench-") as out:
        train(model, data, None, collate_fn, config, out, log=lambda _: None, batching=batching)
        events = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    steps = [e for e in events if e["event"] == "train"]
    plan = BatchPlan(data, collate_fn, args.batch, 0, batching)
    lengths = data.lengths
    real = [sum(lengths[i] for i in plan.consumed(s, 1)) for s in range(args.steps + 1)]
    per_step = [real[s + 1] - real[s] for s in range(args.steps)]
    span = steps[-1]["elapsed_s"] - steps[0]["elapsed_s"]
    pads = [e["padding_fraction"] for e in steps]
    positions = sum(t / (1 - p) for t, p in zip(per_step, pads, strict=True))
    return {
        "real_tokens_per_s": sum(per_step[1:]) / span,
        "padding_fraction": 1 - sum(per_step) / positions,
        "final_loss": steps[-1]["loss"],
        "losses": [e["loss"] for e in steps],
        "real_tokens": sum(per_step),
    }


class _Counter:
    """Wraps TRL's collator: counts real and computed token positions per batch."""

    def __init__(self, collator: Any) -> None:
        self.collator, self.real, self.total, self.batches = collator, [], [], 0

    def __call__(self, features: list[Any]) -> Any:
        batch = self.collator(features)
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        self.real.append(int(mask.sum()) if mask is not None else int(ids.numel()))
        self.total.append(int(ids.numel()))
        return batch


def trl_child(args: argparse.Namespace, examples: list[dict]) -> dict[str, Any]:
    """Train with TRL's SFTTrainer + PEFT on the same pre-tokenized examples."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(0)
    rows = {
        "input_ids": [ex["input_ids"] for ex in examples],
        "completion_mask": [[int(v != -100) for v in ex["labels"]] for ex in examples],
    }
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    packed = args.child == "trl_packed"
    config = SFTConfig(
        output_dir=tempfile.mkdtemp(prefix="throughput-bench-trl-"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        packing=packed,
        max_length=args.max_length,
        completion_only_loss=True,
        gradient_checkpointing=False,  # TRL's default is True; tilpass's (and this run's) False
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
    )
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=Dataset.from_dict(rows), peft_config=lora
    )
    counter = _Counter(trainer.data_collator)
    trainer.data_collator = counter
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a: Any, **k: Any) -> None:
            times.append(time.perf_counter())

    trainer.add_callback(Clock())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "real_tokens_per_s": sum(counter.real[1 : len(times)]) / (times[-1] - times[0]),
        "padding_fraction": 1 - sum(counter.real) / sum(counter.total),
        "final_loss": losses[-1],
        "losses": losses,
        "real_tokens": sum(counter.real[: len(times)]),
    }


def run_child(args: argparse.Namespace) -> None:
    examples = json.loads(Path(args.examples).read_text())
    started = time.perf_counter()
    fn = trl_child if args.child in TRL else tilpass_child
    result = fn(args, examples)
    result |= {"peak_rss_mb": peak_rss_mb(), "process_s": time.perf_counter() - started}
    print("RESULT " + json.dumps(result), flush=True)


# -- parent ----------


def spawn(
    args: argparse.Namespace, child: str, examples: Path, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run one configuration in its own process; its RESULT line, or the error."""
    python = args.trl_python if child in TRL else sys.executable
    cmd = [python, __file__, "--child", child, "--examples", str(examples), "--model", args.model]
    cmd += ["--steps", str(args.steps), "--batch", str(args.batch), "--lr", str(args.lr)]
    cmd += ["--max-length", str(args.max_length)]
    base = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(SRC)}
    proc = subprocess.run(cmd, env={**base, **(env or {})}, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-3:]}


def busy_process() -> subprocess.Popen[bytes]:
    """One single-threaded process that keeps a core busy until killed."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def shared_cases(args: argparse.Namespace, examples: Path) -> dict[str, Any]:
    """tilpass_packed alone and beside a busy process, default and PASSIVE waiting."""
    out: dict[str, Any] = {}
    for busy in (False, True):
        for policy in ("default", "passive"):
            env = {"OMP_WAIT_POLICY": "PASSIVE"} if policy == "passive" else {}
            hog = busy_process() if busy else None
            try:
                key = f"{'beside_busy' if busy else 'alone'}_{policy}"
                log(f"shared-machine case {key}")
                out[key] = spawn(args, "tilpass_packed", examples, env)
            finally:
                if hog is not None:
                    hog.kill()
                    hog.wait()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--examples", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help="local model directory (default model)")
    p.add_argument("--trl-python", default=None, help="python of a venv with trl and peft")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--ragged", type=int, default=400, help="examples in the ragged set")
    p.add_argument("--ragged-max", type=int, default=1000)
    p.add_argument("--quick", action="store_true", help="smoke run: 3 steps, short rows")
    p.add_argument("--shared", action="store_true", help="also the shared-machine cases")
    p.add_argument("--sets", default="shipped,ragged", help="datasets to run, comma-separated")
    p.add_argument("--configs", default=",".join(TILPASS + TRL), help="configurations to run")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()
    if args.child:
        run_child(args)
        return
    if args.quick:
        args.steps, args.batch, args.max_length, args.ragged, args.ragged_max = 3, 4, 256, 64, 250
    args.model = args.model or default_model_dir()
    results = run_all(args)
    text = json.dumps(results, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(markdown(results))


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    """Every configuration on both datasets (and the shared-machine cases if asked)."""
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(args.model).vocab_size
    wanted = args.sets.split(",")
    sets = {}
    if "shipped" in wanted:
        sets["shipped"] = shipped_examples(args.model, args.max_length)
    if "ragged" in wanted:
        sets["ragged"] = ragged_examples(args.ragged, 20, args.ragged_max, vocab)
    results: dict[str, Any] = {"settings": vars(args).copy(), "machine": machine()}
    with tempfile.TemporaryDirectory(prefix="throughput-bench-data-") as tmp:
        for name, examples in sets.items():
            path = Path(tmp) / f"{name}.json"
            path.write_text(json.dumps(examples))
            children = TILPASS + (TRL if args.trl_python else ())
            for child in (c for c in children if c in args.configs.split(",")):
                log(f"{name}: {child}")
                results[f"{name}/{child}"] = spawn(args, child, path)
                log(f"{name}: {child}: {json.dumps(results[f'{name}/{child}'])}")
            if args.shared and name == "ragged":
                results["shared"] = shared_cases(args, path)
    return results


def machine() -> dict[str, Any]:
    import platform

    import torch
    import transformers

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": len(os.sched_getaffinity(0)),
        "load_average_1min": os.getloadavg()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }


def markdown(results: dict[str, Any]) -> str:
    """The results as a Markdown table."""
    lines = [
        "| data | configuration | real tokens/s | padding | peak RSS MB | final loss |",
        "|---|---|---:|---:|---:|---:|",
    ]
    rows = {k: v for k, v in results.items() if "/" in k}
    rows |= {f"ragged/shared {k}": v for k, v in results.get("shared", {}).items()}
    for key, r in rows.items():
        data, config = key.split("/", 1)
        if "error" in r:
            lines.append(f"| {data} | {config} | error: {' '.join(r['error'])[:120]} | | | |")
            continue
        lines.append(
            f"| {data} | {config} | {r['real_tokens_per_s']:.0f} | {r['padding_fraction']:.0%} "
            f"| {r['peak_rss_mb']:.0f} | {r['final_loss']:.4f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
