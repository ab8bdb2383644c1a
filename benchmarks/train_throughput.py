"""Training throughput on ragged data: tilpass padded / grouped / packed against TRL.

The default model (SmolLM2-135M-Instruct), LoRA r=8 (alpha 16, no dropout) on q_proj and
v_proj, fp32 on the CPU. Two datasets, tokenized once here so every configuration trains on
the same examples: the shipped ``specialty_train.jsonl`` (its natural lengths) and a synthetic
ragged set (lengths drawn uniformly from 20-1,000 tokens, random ids, loss on the second half
of each example). Every configuration runs in its own process, from the same initial adapter
(saved here once: the same A, B = 0), with the same number of optimizer steps, batch size,
learning rate (cosine, no warm-up), AdamW settings and gradient clipping:

- ``tilpass_padded``, ``tilpass_grouped``, ``tilpass_packed``: ``tilpass.train.train`` with
  ``Batching(...)``; a step holds ``batch`` examples (random order, seed 0; grouped: similar
  lengths together). Packed, each step's examples are one padding-free row.
- ``trl_padded``: TRL's ``SFTTrainer`` + PEFT, ``batch`` examples per step padded (TRL's own
  shuffled order).
- ``trl_packed``: TRL's padding-free packed step (its collator flattens the step into one row
  with position ids restarting per example, as ``packing=True`` does) fed **the very examples
  of each tilpass packed step**, in order: one dataset row per step with its ``seq_lengths``,
  a batch of 1, no shuffling. So both packed runs see the same tokens per step and their loss
  curves must agree step by step. (TRL's own ``packing=True`` fills ``batch`` rows of
  ``max_length`` tokens from the whole dataset: a different example order and about twice the
  tokens per step on the ragged set, so neither its loss curve nor its step is comparable.)

TRL is a benchmark-only dependency: its children run under ``--trl-python`` (a separate
virtual environment). Each child reports real (non-padding) tokens/s over the steps after the
first (wall clock), the CPU seconds per step and real tokens per CPU second over the same
steps (the measure that stays fair on a loaded machine when the children run with one
thread), the padding fraction (share of computed positions that were padding), peak RSS and
the per-step training losses. ``--shared`` adds the shared-machine case on the shipped set:
``tilpass_packed`` beside one single-threaded busy process, with the OpenMP default wait
policy and with ``PASSIVE``, and alone with ``PASSIVE`` (alone with the default is the main
run).

The defaults are the full run, sized for about 12 minutes on an idle 2-core machine (estimated
from CPU seconds per step measured with ``benchmarks/packed_step_profile.py``; see
docs/benchmarks.md): shipped set, all five configurations, batch 8, 7 steps; ragged set, the
three configurations the goals compare (tilpass padded and packed, TRL packed), batch 4, 7
steps; the three shared-machine runs. ``--ragged-batch 8 --ragged-configs all`` is the
complete ragged comparison (estimated at about 37 minutes in all)::

    python benchmarks/train_throughput.py --trl-python /path/to/trl-venv/bin/python \\
        --shared --json train_throughput.json                               # full run
    python benchmarks/train_throughput.py --quick --trl-python ...         # smoke run
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
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- data and the initial adapter (parent process) ----------


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


def step_groups(examples: list[dict], batch: int, steps: int) -> list[list[int]]:
    """The example indices of each of tilpass's first ``steps`` steps (random order, seed 0)."""
    from tilpass.data.batching import TokenizedDataset, collate
    from tilpass.data.packing import Batching, BatchPlan
    from tilpass.data.sources import DataStats

    data = TokenizedDataset(examples, DataStats(path="benchmark"), pad_token_id=0)
    plan = BatchPlan(data, lambda b: collate(b, 0), batch, 0, Batching(packing=True))
    per_epoch = len(plan.epoch_batches(0))
    return [plan.epoch_batches(s // per_epoch)[s % per_epoch] for s in range(steps)]


def save_initial_adapter(model_dir: str, out: Path) -> None:
    """LoRA A drawn once (seed 0), B = 0, in PEFT's layout: every child starts from it."""
    import torch
    from transformers import AutoModelForCausalLM

    from tilpass import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    get_peft_model(model, LoraConfig(**LORA)).save_pretrained(str(out))


# -- children ----------


def print_nothing(_: str) -> None:
    """The training log's lines are not needed here."""


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class StepClock:
    """Wall and CPU time at the end of every optimizer step (tilpass hook / TRL callback)."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def tick(self) -> None:
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())

    def summary(self, real_per_step: list[int]) -> dict[str, Any]:
        """Rates over the steps after the first (the first pays one-off costs)."""
        timed = sum(real_per_step[1 : len(self.wall)])
        wall, cpu = self.wall[-1] - self.wall[0], self.cpu[-1] - self.cpu[0]
        return {
            "real_tokens_per_s": timed / wall,
            "real_tokens_per_cpu_s": timed / cpu,
            "cpu_s_per_step": cpu / (len(self.cpu) - 1),
            "wall_s_per_step": wall / (len(self.wall) - 1),
            "timed_steps": len(self.wall) - 1,
        }


def tilpass_child(args: argparse.Namespace, data: dict[str, Any]) -> dict[str, Any]:
    """Train with tilpass's loop; losses and padding from metrics.jsonl."""
    import torch
    from transformers import AutoModelForCausalLM

    from tilpass.data.batching import TokenizedDataset, collate
    from tilpass.data.packing import Batching, BatchPlan
    from tilpass.data.sources import DataStats
    from tilpass.model import AdaptedModel
    from tilpass.train import TrainConfig, train

    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model = AdaptedModel.from_pretrained(base, args.adapter, is_trainable=True)
    examples = TokenizedDataset(data["examples"], DataStats(path="benchmark"), pad_token_id=0)
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
    clock = StepClock()

    class Tick:
        def on_step_end(self, state: object) -> None:
            clock.tick()

    collate_fn = lambda b: collate(b, 0)  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="throughput-bench-") as out:
        hooks = [Tick()]
        train(
            model,
            examples,
            None,
            collate_fn,
            config,
            out,
            callbacks=hooks,
            log=print_nothing,
            batching=batching,
        )
        events = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    steps = [e for e in events if e["event"] == "train"]
    plan = BatchPlan(examples, collate_fn, args.batch, 0, batching)
    lengths = examples.lengths
    real = [sum(lengths[i] for i in plan.consumed(s, 1)) for s in range(args.steps + 1)]
    per_step = [real[s + 1] - real[s] for s in range(args.steps)]
    pads = [e["padding_fraction"] for e in steps]
    positions = sum(t / (1 - p) for t, p in zip(per_step, pads, strict=True))
    return clock.summary(per_step) | {
        "padding_fraction": 1 - sum(per_step) / positions,
        "final_loss": steps[-1]["loss"],
        "losses": [e["loss"] for e in steps],
        "real_tokens": sum(per_step),
    }


class _Counter:
    """Wraps TRL's collator: counts real and computed token positions per batch."""

    def __init__(self, collator: Any) -> None:
        self.collator, self.real, self.total = collator, [], []

    def __call__(self, features: list[Any]) -> Any:
        batch = self.collator(features)
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        self.real.append(int(mask.sum()) if mask is not None else int(ids.numel()))
        self.total.append(int(ids.numel()))
        return batch


def trl_rows(args: argparse.Namespace, data: dict[str, Any]) -> dict[str, list[Any]]:
    """TRL's dataset: the examples (padded), or one row per tilpass packed step (packed)."""
    examples = data["examples"]
    if args.child == "trl_padded":
        return {
            "input_ids": [ex["input_ids"] for ex in examples],
            "labels": [ex["labels"] for ex in examples],
        }
    rows: dict[str, list[Any]] = {"input_ids": [], "labels": [], "seq_lengths": []}
    for group in data["steps"]:
        rows["input_ids"].append([t for i in group for t in examples[i]["input_ids"]])
        rows["labels"].append([t for i in group for t in examples[i]["labels"]])
        rows["seq_lengths"].append([len(examples[i]["input_ids"]) for i in group])
    return rows


def trl_child(args: argparse.Namespace, data: dict[str, Any]) -> dict[str, Any]:
    """Train with TRL's SFTTrainer + PEFT on the same pre-tokenized examples."""
    import torch
    from datasets import Dataset
    from peft import PeftModel
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, args.adapter, is_trainable=True)
    packed = args.child == "trl_packed"
    config = SFTConfig(
        output_dir=tempfile.mkdtemp(prefix="throughput-bench-trl-"),
        max_steps=args.steps,
        per_device_train_batch_size=1 if packed else args.batch,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        padding_free=packed,  # the collator TRL's packing uses: one flat row, positions restart
        max_length=None if packed else args.max_length,
        gradient_checkpointing=False,  # TRL's default is True; tilpass's (and this run's) False
        bf16=False,  # TRL's default is True (autocast, slow on CPUs without bf16); fp32 as tilpass
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
    )

    class InOrder(SFTTrainer):
        """Packed: the dataset's rows are tilpass's steps, so they are read in order."""

        def _get_train_sampler(self, *a: Any, **k: Any) -> Any:
            if packed:
                return SequentialSampler(self.train_dataset)
            return super()._get_train_sampler(*a, **k)

    dataset = Dataset.from_dict(trl_rows(args, data))
    trainer = InOrder(model=model, args=config, train_dataset=dataset)
    counter = _Counter(trainer.data_collator)
    trainer.data_collator = counter
    clock = StepClock()

    class Tick(TrainerCallback):
        def on_step_end(self, *a: Any, **k: Any) -> None:
            clock.tick()

    trainer.add_callback(Tick())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    steps = len(clock.wall)
    return clock.summary(counter.real[:steps]) | {
        "padding_fraction": 1 - sum(counter.real[:steps]) / sum(counter.total[:steps]),
        "final_loss": losses[-1],
        "losses": losses,
        "real_tokens": sum(counter.real[:steps]),
    }


def run_child(args: argparse.Namespace) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    data = json.loads(Path(args.examples).read_text())
    started, cpu = time.perf_counter(), time.process_time()
    fn = trl_child if args.child in TRL else tilpass_child
    result = fn(args, data)
    result |= {
        "peak_rss_mb": peak_rss_mb(),
        "process_s": time.perf_counter() - started,
        "process_cpu_s": time.process_time() - cpu,
        "threads": torch.get_num_threads(),
    }
    print("RESULT " + json.dumps(result), flush=True)


# -- parent ----------


def spawn(
    args: argparse.Namespace, child: str, examples: Path, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run one configuration in its own process; its RESULT line, or the error."""
    python = args.trl_python if child in TRL else sys.executable
    cmd = [python, __file__, "--child", child, "--examples", str(examples), "--model", args.model]
    cmd += ["--adapter", args.adapter, "--steps", str(args.steps), "--batch", str(args.batch)]
    cmd += ["--lr", str(args.lr), "--max-length", str(args.max_length)]
    base = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(SRC)}
    if args.threads:
        base["OMP_NUM_THREADS"] = str(args.threads)
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, env={**base, **(env or {})}, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-3:]}


def busy_process() -> subprocess.Popen[bytes]:
    """One single-threaded process that keeps a core busy until killed."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def shared_cases(args: argparse.Namespace, examples: Path) -> dict[str, Any]:
    """tilpass_packed beside a busy process (default and PASSIVE waiting), alone with PASSIVE."""
    out: dict[str, Any] = {}
    for key, busy, env in (
        ("alone_passive", False, {"OMP_WAIT_POLICY": "PASSIVE"}),
        ("beside_busy_default", True, {}),
        ("beside_busy_passive", True, {"OMP_WAIT_POLICY": "PASSIVE"}),
    ):
        hog = busy_process() if busy else None
        try:
            log(f"shared-machine case {key}")
            out[key] = spawn(args, "tilpass_packed", examples, env)
        finally:
            if hog is not None:
                hog.kill()
                hog.wait()
    return out


ALL = ",".join(TILPASS + TRL)
GOAL_CONFIGS = "tilpass_padded,tilpass_packed,trl_packed"  # what the goals compare


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--examples", default=None, help=argparse.SUPPRESS)
    p.add_argument("--adapter", default=None, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=0, help=argparse.SUPPRESS)  # a child's
    p.add_argument("--batch", type=int, default=0, help=argparse.SUPPRESS)  # a child's
    p.add_argument("--model", default=None, help="local model directory (default model)")
    p.add_argument("--trl-python", default=None, help="python of a venv with trl and peft")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--max-length", type=int, default=1024)
    for name, steps, batch, configs in (("shipped", 7, 8, ALL), ("ragged", 7, 4, GOAL_CONFIGS)):
        p.add_argument(f"--{name}-steps", type=int, default=steps, help="optimizer steps")
        p.add_argument(f"--{name}-batch", type=int, default=batch, help="examples per step")
        p.add_argument(f"--{name}-configs", default=configs, help="configurations, or 'all'")
    p.add_argument("--ragged", type=int, default=400, help="examples in the ragged set")
    p.add_argument("--ragged-max", type=int, default=1000)
    p.add_argument("--threads", type=int, default=0, help="threads per child (0: default)")
    p.add_argument("--quick", action="store_true", help="smoke run: 3 steps, short rows")
    p.add_argument("--shared", action="store_true", help="also the shared-machine cases")
    p.add_argument("--shared-set", default="shipped", help="dataset of the shared-machine cases")
    p.add_argument("--sets", default="shipped,ragged", help="datasets to run, comma-separated")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()
    if args.child:
        run_child(args)
        return
    if args.quick:
        args.max_length, args.ragged, args.ragged_max = 256, 64, 250
        args.shipped_steps = args.ragged_steps = 3
    args.model = args.model or default_model_dir()
    results = run_all(args)
    text = json.dumps(results, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(markdown(results))


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    """The chosen configurations on each dataset (and the shared-machine cases if asked)."""
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
        args.adapter = str(Path(tmp) / "initial-adapter")
        save_initial_adapter(args.model, Path(args.adapter))
        for name, examples in sets.items():
            path = Path(tmp) / f"{name}.json"
            args.steps, args.batch = getattr(args, f"{name}_steps"), getattr(args, f"{name}_batch")
            steps = step_groups(examples, args.batch, args.steps)
            path.write_text(json.dumps({"examples": examples, "steps": steps}))
            configs = getattr(args, f"{name}_configs").replace("all", ALL).split(",")
            children = TILPASS + (TRL if args.trl_python else ())
            for child in (c for c in children if c in configs):
                log(f"{name}: {child}")
                results[f"{name}/{child}"] = spawn(args, child, path)
                log(f"{name}: {child}: {json.dumps(results[f'{name}/{child}'])}")
            if args.shared and name == args.shared_set:
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
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def ratios(results: dict[str, Any]) -> list[str]:
    """The goals: packed against TRL packed and against padded, and the loss curves' gap."""
    lines = []
    for data in ("shipped", "ragged"):
        get = results.get
        ours, trl = get(f"{data}/tilpass_packed", {}), get(f"{data}/trl_packed", {})
        padded = get(f"{data}/tilpass_padded", {})
        for label, other in (("TRL packed", trl), ("tilpass padded", padded)):
            if "real_tokens_per_s" in ours and "real_tokens_per_s" in other:
                wall = ours["real_tokens_per_s"] / other["real_tokens_per_s"]
                cpu = ours["real_tokens_per_cpu_s"] / other["real_tokens_per_cpu_s"]
                lines.append(
                    f"- {data}: tilpass packed / {label}: {wall:.2f}x real tokens/s, "
                    f"{cpu:.2f}x real tokens per CPU second"
                )
        if "losses" in ours and "losses" in trl:
            gap = max(abs(a - b) for a, b in zip(ours["losses"], trl["losses"], strict=False))
            lines.append(f"- {data}: largest per-step loss gap, tilpass packed vs TRL: {gap:.2e}")
    return lines


def markdown(results: dict[str, Any]) -> str:
    """The results as a Markdown table, then the ratios."""
    lines = [
        "| data | configuration | real tokens/s | tokens/CPU-s | CPU s/step | padding "
        "| peak RSS MB | final loss |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    rows = {k: v for k, v in results.items() if "/" in k}
    shared_set = results["settings"].get("shared_set", "shipped")
    rows |= {f"{shared_set}/shared {k}": v for k, v in results.get("shared", {}).items()}
    for key, r in rows.items():
        data, config = key.split("/", 1)
        if "error" in r:
            lines.append(f"| {data} | {config} | error: {' '.join(r['error'])[:120]} |||||")
            continue
        lines.append(
            f"| {data} | {config} | {r['real_tokens_per_s']:.0f} "
            f"| {r['real_tokens_per_cpu_s']:.0f} | {r['cpu_s_per_step']:.2f} "
            f"| {r['padding_fraction']:.0%} | {r['peak_rss_mb']:.0f} | {r['final_loss']:.4f} |"
        )
    return "\n".join([*lines, "", *ratios(results)])


if __name__ == "__main__":
    main()
