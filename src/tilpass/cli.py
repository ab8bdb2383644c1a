"""The `tilpass` command: quickstart, train, eval, generate, chat and doctor here; the other
verbs (merge, memory, export, export-gguf, inspect, verify, record, card, serve, compare) in
their own `*_cli.py` modules, each registered with one `add_<verb>_parser` call.

Argument parsing and printing only; the work is in `tilpass.run` and the modules it calls.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tilpass.compare.cli import add_compare_parser
from tilpass.config_yaml import ConfigSources, load_config_file, read_overrides
from tilpass.errors import TilpassError
from tilpass.export_cli import add_export_parser
from tilpass.gguf_cli import add_export_gguf_parser
from tilpass.inspect_cli import (
    add_card_parser,
    add_inspect_parser,
    add_record_parser,
    add_verify_parser,
)
from tilpass.memory_cli import add_memory_parser
from tilpass.merge_cli import add_merge_parser, add_quantize_argument
from tilpass.serve.cli import add_serve_parser

if TYPE_CHECKING:  # run.py imports torch; the CLI imports it only when a command needs it
    from tilpass.run import RunConfig, RunResult

QUICKSTART_TASK = "map a patient's symptom description to the medical specialty that treats it"
# Settings for the quickstart, measured to fit the 10-minute budget on 2 CPU cores
# (docs/dataset.md has the numbers behind them).
QUICKSTART = {
    "task": QUICKSTART_TASK,
    "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
    "data": {"max_length": 128},
    "training": {
        "learning_rate": 2e-3,
        "batch_size": 8,
        "max_steps": 120,
        "warmup_steps": 10,
        "lr_scheduler": "cosine",
        "logging_steps": 10,
        "eval_batch_size": 25,
        "eval_max_new_tokens": 8,
        "eval_generation_samples": 0,
        "save_steps": 60,
    },
}


def shipped_data(name: str) -> str:
    """Path of a dataset file that ships inside the package (`tilpass/data/`)."""
    return str(resources.files("tilpass.data") / name)


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """`--a.b value` / `--a.b=value` pairs into a nested dict; values are parsed as YAML."""
    return read_overrides(list(items))[0]


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Deep merge: `extra` wins; nested sections merge key by key."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def _train_help() -> str:
    from tilpass.run import FULL, help_sections

    lines = [
        "fields (set in the YAML file, or override with --section.key value; lists and",
        "mappings in YAML flow syntax, e.g. --lora.rank_pattern '{q_proj: 4}'). Only the",
        "section of the run's method is read: a section for another method is an error;",
        f"method: {FULL} trains every parameter and takes no section.",
    ]
    for title, rows in help_sections():
        lines += ["", f"{title}:"]
        lines += [f"  {key:<40} {default!r:<22} {text}".rstrip() for key, default, text in rows]
    return "\n".join(lines)


def _print_table(before: dict[str, Any], after: dict[str, Any], trained: str) -> None:
    keys = [k for k in ("exact_match", "loss", "perplexity") if k in before or k in after]
    print(f"\n{'metric':<14}{'base model':>14}{trained:>16}")
    for key in keys:
        b, a = before.get(key), after.get(key)
        fmt = (lambda v: f"{100 * v:.1f}%") if key == "exact_match" else (lambda v: f"{v:.3f}")
        print(
            f"{key:<14}{fmt(b) if b is not None else '-':>14}{fmt(a) if a is not None else '-':>16}"
        )


def _print_outcome(result: RunResult, config: RunConfig) -> None:
    """The before/after table and how to use what the run saved."""
    from tilpass.run import FULL

    full = config.method == FULL
    _print_table(result.before, result.after, "fine-tuned" if full else "with adapter")
    if full:
        _full_model_hint(result.saved_dir)
    else:
        _usage_hint(result.saved_dir, config.model)


_EXAMPLE_PROMPT = '"I have had chest pain and palpitations for two weeks."'


def _usage_hint(adapter_dir: Path, model: str) -> None:
    print(
        f"\nadapter saved in {adapter_dir} (adapter_model.safetensors, README.md, "
        "tilpass_record.json)"
    )
    print("try it:")
    print(f"  tilpass generate --model {model} --adapter {adapter_dir} {_EXAMPLE_PROMPT}")
    print("in Python:")
    print("  from tilpass import AdaptedModel")
    print("  from tilpass.pretrained import load_model")
    print(f'  base, tokenizer = load_model("{model}")')
    print(f'  model = AdaptedModel.from_pretrained(base, "{adapter_dir}")')


def _full_model_hint(model_dir: Path) -> None:
    print(
        f"\nfine-tuned model saved in {model_dir} (a complete Hugging Face model: weights, "
        "config, tokenizer, README.md, tilpass_record.json)"
    )
    print("try it:")
    print(f"  tilpass generate --model {model_dir} {_EXAMPLE_PROMPT}")
    print("in Python:")
    print("  from transformers import AutoModelForCausalLM")
    print(f'  model = AutoModelForCausalLM.from_pretrained("{model_dir}")')


def cmd_train(args: argparse.Namespace, extra: list[str]) -> int:
    from tilpass.run import build_config, run
    from tilpass.runtime import apply_process_settings

    values: dict[str, Any] = {}
    sources = ConfigSources()
    args.config = extra.pop(0) if extra and not extra[0].startswith("-") else None
    if args.config:
        values, sources.lines = load_config_file(args.config)
        sources.file = str(args.config)
    overrides, sources.overrides = read_overrides(extra)
    if args.skip_bad_rows:
        overrides = merge(overrides, {"data": {"skip_bad_rows": True}})
        sources.overrides.add(("data", "skip_bad_rows"))
    if args.quantize:
        overrides = merge(overrides, {"quantize": args.quantize})
        sources.overrides.add(("quantize",))
    config = build_config(merge(values, overrides), sources)
    apply_process_settings(config.training)  # process-wide: the CLI's choice, not train()'s
    from tilpass.distributed import check_engine

    check_engine(args.shard, config.quantize)  # before anything is launched or loaded
    if args.nproc is not None and "WORLD_SIZE" not in os.environ:
        from tilpass.distributed import choose_backend
        from tilpass.distributed_launch import launch

        choose_backend(args.backend)  # a GPU backend on a machine without GPUs: say so now
        return launch(args.nproc, args.argv)
    from tilpass.distributed import DataParallel, world_session

    with world_session(args.backend) as world:
        dp = DataParallel(world, shard=args.shard)
        result = run(
            config,
            resume=args.resume,
            overwrite=args.overwrite,
            sources=sources,
            distributed=dp,
            banner=getattr(args, "banner", ()),
        )
    if world.is_main:
        _print_outcome(result, config)
    return 0


def cmd_quickstart(args: argparse.Namespace, extra: list[str]) -> int:
    from tilpass.run import build_config, run
    from tilpass.runtime import apply_process_settings

    values = merge(
        QUICKSTART,
        {
            "output_dir": args.output,
            "data": {
                "train": shipped_data("specialty_train.jsonl"),
                "eval": shipped_data("specialty_test.jsonl"),
            },
        },
    )
    overrides, paths = read_overrides(extra)
    sources = ConfigSources(overrides=paths, default="quickstart")
    if args.quantize:
        overrides = merge(overrides, {"quantize": args.quantize})
        sources.overrides.add(("quantize",))
    config = build_config(merge(values, overrides), sources)
    base = f"{config.model} ({config.quantize} base: QLoRA)" if config.quantize else config.model
    print(f"tilpass quickstart: LoRA on {base}, task: {QUICKSTART_TASK}")
    apply_process_settings(config.training)
    result = run(
        config,
        resume=args.resume,
        overwrite=args.overwrite,
        sources=sources,
        banner=getattr(args, "banner", ()),
    )
    _print_table(result.before, result.after, "with adapter")
    _print_examples(result.examples)
    _usage_hint(result.saved_dir, config.model)
    return 0


def _print_examples(examples: list[dict[str, Any]], count: int = 3) -> None:
    for example in examples[:count]:
        print(f"  e.g. expected {example.get('reference')!r}, got {example.get('prediction')!r}")


def _load(model: str, adapter: str | None) -> tuple[Any, Any]:
    from tilpass.card import base_model_warning
    from tilpass.model import AdaptedModel
    from tilpass.pretrained import load_model

    base, tokenizer = load_model(model)
    if adapter is None:
        return base, tokenizer
    adapted = AdaptedModel.from_pretrained(base, adapter)
    warning = base_model_warning(adapter, model)
    if warning:
        print(warning, file=sys.stderr)
    return adapted, tokenizer


def _reply(model: Any, tokenizer: Any, messages: list[dict[str, str]], max_new_tokens: int) -> str:
    import torch

    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(
            **ids,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def cmd_generate(args: argparse.Namespace, extra: list[str]) -> int:
    model, tokenizer = _load(args.model, args.adapter)
    print(_reply(model, tokenizer, [{"role": "user", "content": args.prompt}], args.max_new_tokens))
    return 0


def cmd_chat(args: argparse.Namespace, extra: list[str]) -> int:
    model, tokenizer = _load(args.model, args.adapter)
    history: list[dict[str, str]] = []
    print("chat with the model; an empty line or Ctrl-D quits.")
    for line in sys.stdin:
        text = line.strip()
        if not text:
            break
        history.append({"role": "user", "content": text})
        answer = _reply(model, tokenizer, history, args.max_new_tokens)
        history.append({"role": "assistant", "content": answer})
        print(f"assistant: {answer}", flush=True)
    return 0


def cmd_eval(args: argparse.Namespace, extra: list[str]) -> int:
    from tilpass.data import build_dataset
    from tilpass.run import build_config, held_out_metrics, scored_records

    overrides, paths = read_overrides(extra)
    flags = {"training": {"eval_max_new_tokens": args.max_new_tokens}}
    if args.skip_bad_rows:
        flags["data"] = {"skip_bad_rows": True}
    sources = ConfigSources(overrides=paths | {("training", "eval_max_new_tokens")})
    config: RunConfig = build_config(merge(overrides, flags), sources)
    if not Path(args.data).exists():
        raise ValueError(f"--data {args.data}: no such file or directory")
    model, tokenizer = _load(args.model, args.adapter)
    section = config.data
    dataset = build_dataset(
        args.data,
        tokenizer,
        max_length=section.max_length,
        skip_bad_rows=section.skip_bad_rows,
        format=section.format,
    )
    print(f"eval data: {dataset.stats.summary()}")
    records = scored_records(args.data, section)
    if records:
        budget = config.training.eval_max_new_tokens
        print(f"exact match: greedy decoding, up to {budget} new tokens per answer")
    metrics = held_out_metrics(model, tokenizer, dataset, records, config)
    examples = metrics.pop("examples", [])
    for key, value in metrics.items():
        print(f"{key}: {value:.4f}")
    _print_examples(examples)
    return 0


def cmd_doctor(args: argparse.Namespace, extra: list[str]) -> int:
    from tilpass.doctor import main as doctor

    return doctor()


_OVERWRITE_HELP = "delete a run already in the output directory first (else it is refused)"


def add_distributed_arguments(p: argparse.ArgumentParser) -> None:
    """`--nproc`, `--backend` and `--shard` of `tilpass train` (docs/distributed.md)."""
    p.add_argument(
        "--nproc",
        type=int,
        default=None,
        help="data-parallel ranks on this machine (relaunches the command under torchrun)",
    )
    p.add_argument(
        "--backend",
        choices=("auto", "gloo", "nccl"),
        default="auto",
        help="communication backend: auto = nccl on GPUs, gloo on CPU",
    )
    p.add_argument(
        "--shard",
        action="store_true",
        help="FSDP2: shard the frozen base over the ranks (fully_shard per block) instead of DDP",
    )


def add_thread_arguments(p: argparse.ArgumentParser) -> None:
    """``--threads`` and ``--wait-policy`` (default: chosen from the machine's load)."""
    p.add_argument("--threads", default=None, help="CPU threads: a number or 'auto' (default)")
    p.add_argument(
        "--wait-policy",
        default=None,
        help="OpenMP waiting: auto (passive on a busy machine) | default | passive | active",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tilpass", description=__doc__.splitlines()[0])
    from tilpass import __version__

    parser.add_argument("--version", action="version", version=f"tilpass {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    from tilpass.pretrained import DEFAULT_MODEL

    p = sub.add_parser("quickstart", help="train a LoRA on the shipped dataset, show before/after")
    p.add_argument("--output", default="runs/quickstart", help="output directory")
    p.add_argument("--resume", default=None, help="'auto' or a checkpoint path")
    p.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
    add_quantize_argument(p)
    add_thread_arguments(p)
    p.set_defaults(func=cmd_quickstart)

    p = sub.add_parser(
        "train",
        help="train an adapter from a YAML config",
        usage="tilpass train [CONFIG.yaml] [--section.key value ...] [--resume R]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_train_help(),
    )
    p.add_argument("--resume", default=None, help="'auto' (latest checkpoint) or a checkpoint path")
    p.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
    p.add_argument("--skip-bad-rows", action="store_true", help="skip and count malformed rows")
    add_quantize_argument(p)
    add_distributed_arguments(p)
    add_thread_arguments(p)
    p.set_defaults(func=cmd_train)

    for name, func, text in (
        ("generate", cmd_generate, "answer one prompt"),
        ("chat", cmd_chat, "interactive chat (reads stdin)"),
        ("eval", cmd_eval, "score a model or adapter on a dataset"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--model", default=DEFAULT_MODEL, help="model name or local directory")
        p.add_argument("--adapter", default=None, help="adapter directory (PEFT layout)")
        p.add_argument(
            "--max-new-tokens", type=int, default=64, help="generation budget per answer"
        )
        if name == "generate":
            p.add_argument("prompt")
        if name == "eval":
            p.add_argument("--data", required=True, help="dataset file")
            p.add_argument(
                "--skip-bad-rows", action="store_true", help="skip and count malformed rows"
            )
        p.set_defaults(func=func)
    p = sub.add_parser("doctor", help="check the installation: versions, default model, device")
    p.set_defaults(func=cmd_doctor)
    add_merge_parser(sub)
    add_export_parser(sub)
    add_export_gguf_parser(sub)
    add_memory_parser(sub)
    add_inspect_parser(sub)
    add_verify_parser(sub)
    add_record_parser(sub)
    add_card_parser(sub)
    add_serve_parser(sub)
    add_compare_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `tilpass` console script."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tilpass never reaches for a model hub
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what --nproc relaunches
    if extra and args.command not in ("train", "quickstart", "eval"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command in ("train", "quickstart"):
            from tilpass.threads import configure_threads

            choice = configure_threads(args.threads, args.wait_policy, may_restart=argv is None)
            args.banner = [choice.describe()]  # printed once the settings are checked
        return int(args.func(args, extra))
    except (TilpassError, ValueError, OSError, ImportError, NotImplementedError) as exc:
        print(f"tilpass {args.command}: error: {exc}", file=sys.stderr)
        return int(getattr(exc, "exit_code", 2))  # a rank that lost another says so
    except KeyboardInterrupt:
        print(
            "interrupted; rerun with --resume auto to continue from the last checkpoint",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
