"""Methods benchmark: every registered method side by side against the base model, and
bottleneck adapters against AdapterHub's `adapters` library.

On the core benchmark's random Llama (benchmarks/common.py; `--quick` uses a smaller one) each
variant gets: extra parameters (% of base), forward latency as the median per-round ratio to
the base model at 1 x 1 token, 16 x 1 and 1 x 128 (prefill), one training step's time and
peak memory, and the adapter file's size. Variants come from the method registry: the table
`SETTINGS` says how to benchmark a method it names (LoRA merged and unmerged r=16 on every
linear; (IA)^3 defaults; Houlsby, Pfeiffer and parallel with bottleneck 64), and a method it
does not name runs with `PEFT_TYPE_SETTINGS` or its config's defaults, so a new method appears
without editing this file. A mixed batch of 8 bottleneck adapters is timed against one.
AdaLoRA's whole training step (regulariser, importance scores, masking) is timed against a
LoRA step of rank init_r and PEFT's AdaLoRA step (benchmarks/adalora_steps.py;
`--adalora-only` runs just that).

Unmerged variants share the base model's weight tensors (see `build_variant`).

AdapterHub 1.3 pins transformers 4.57, so the comparison with it runs in a virtualenv this
script creates (`--peer-venv`, default `~/.cache/tilpass/bench-adapterhub-venv`:
`pip install adapters==1.3.0`, torch reused from this environment). There,
benchmarks/adapterhub_peer.py builds the same model once and puts AdapterHub's
`DoubleSeqBnConfig` (Houlsby) and `SeqBnConfig` (Pfeiffer) and tilpass's Houlsby and Pfeiffer
(imported from this checkout, same width, AdapterHub's adapter tensors copied in) over its
shared weights, checks that the two Houlsby models give the same logits, and times all of
them interleaved in that one process: `tilpass / AdapterHub` is a per-round ratio.

    python benchmarks/methods.py --json methods.json
    python benchmarks/methods.py --quick --rounds 5     # smaller model, a few minutes
    python benchmarks/methods.py --quick --adalora-only --rounds 5
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from adalora_steps import adalora_steps, print_adalora
from common import (
    Gate,
    core_llama_config,
    interleaved_rounds,
    machine_info,
    machine_line,
    markdown_table,
    median,
    per_round_ratio,
    shared_copy,
    time_call,
    timer,
    write_json,
)

SHAPES = [(1, 1), (16, 1), (1, 128)]
BOTTLENECK = 64
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = {"r": 16, "lora_alpha": 32, "target_modules": ALL_LINEAR}


@dataclasses.dataclass(frozen=True)
class Variant:
    """One benchmarked adapter: a registered method with settings, merged or not."""

    label: str
    method: str
    settings: dict[str, Any]
    merged: bool = False


SETTINGS: dict[str, list[Variant]] = {
    "lora": [
        Variant("LoRA merged", "lora", LORA, merged=True),
        Variant("LoRA unmerged", "lora", LORA),
    ],
    "ia3": [Variant("(IA)3", "ia3", {})],
    "adalora": [
        Variant(
            "AdaLoRA",
            "adalora",
            {"init_r": 12, "target_r": 8, "target_modules": ALL_LINEAR, "total_step": 1000},
        )
    ],
    "bottleneck": [
        Variant("Houlsby", "bottleneck", {"bottleneck_size": BOTTLENECK, "non_linearity": "silu"}),
        Variant("Pfeiffer", "bottleneck", {"bottleneck_size": BOTTLENECK, "placement": "pfeiffer"}),
        Variant("parallel", "bottleneck", {"bottleneck_size": BOTTLENECK, "placement": "parallel"}),
    ],
}
PEFT_TYPE_SETTINGS = {
    "PROMPT_TUNING": {"num_virtual_tokens": 20},
    "LORA_PROMPT": {"target_modules": ["q_proj", "v_proj"], "num_virtual_tokens": 20},
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def registry_variants() -> list[Variant]:
    """The variants of every registered method (the table's, else one with defaults)."""
    from tilpass.methods import METHODS

    out: list[Variant] = []
    for name, method in METHODS.items():
        default = [Variant(name, name, PEFT_TYPE_SETTINGS.get(method.peft_type, {}))]
        out += SETTINGS.get(name, default)
    return out


def model_config(quick: bool) -> Any:
    config = core_llama_config()
    if quick:
        config.hidden_size, config.intermediate_size = 512, 1408
        config.num_hidden_layers, config.num_attention_heads = 4, 8
        config.num_key_value_heads, config.vocab_size = 8, 8000
    return config


def build_variant(base: torch.nn.Module, variant: Variant, copy_base: bool = True) -> Any:
    """`base` (or a copy) with the variant's adapter, its tensors perturbed to be non-zero.

    An unmerged variant's copy shares `base`'s weight tensors: every variant then reads the
    same base weights from the same memory, so a ratio to the base model measures the adapter,
    not where in memory a copy of the weights happened to land (plain copies of one model
    differ by a few per cent on this benchmark's machine). A merged variant owns a copy.
    """
    import tilpass
    from tilpass.methods import method_named

    config = method_named(variant.method).config_class(**variant.settings)
    if copy_base:
        base = copy.deepcopy(base) if variant.merged else shared_copy(base)
    model = tilpass.get_peft_model(base, config)
    with torch.no_grad():
        for param in model.adapter_parameters("default"):
            param.add_(torch.randn_like(param) * 0.02)
    return model.merge_and_unload() if variant.merged else model


def adapter_file_bytes(model: Any) -> int:
    with tempfile.TemporaryDirectory(prefix="bench-methods-") as tmp:
        model.save_pretrained(tmp)
        return (Path(tmp) / "adapter_model.safetensors").stat().st_size


def latency(
    models: dict[str, Any], vocab: int, rounds: int, reps: int
) -> dict[str, dict[str, Any]]:
    """Per shape: seconds per round of every model, interleaved (the base model included)."""
    out: dict[str, dict[str, Any]] = {}
    for batch, length in SHAPES:
        ids = torch.randint(3, vocab, (batch, length))

        def forward(model: Any, ids: torch.Tensor = ids) -> None:
            with torch.inference_mode():
                model(input_ids=ids)

        variants = {name: timer(lambda m=m: forward(m), reps) for name, m in models.items()}
        out[f"{batch}x{length}"] = interleaved_rounds(variants, rounds)
        log(f"latency {batch}x{length} done")
    return out


def current_rss() -> tuple[int, int]:
    """(resident, peak resident) bytes of this process (Linux /proc)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def train_step(model: Any, vocab: int, steps: int) -> tuple[float, float]:
    """Median seconds of an AdamW step (batch 4 x 128) and the peak memory the first step
    adds (CUDA: allocated bytes; CPU: resident-set growth after resetting the peak)."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(3, vocab, (4, 128))

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    gc.collect()
    if os.path.exists("/proc/self/clear_refs"):
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak to the current RSS
    before = current_rss()[0]
    step()
    peak = current_rss()[1] - before
    seconds = median([time_call(step) for _ in range(steps)])
    optimizer.zero_grad(set_to_none=True)
    model.eval()
    return seconds, peak / 2**20


def train_child(label: str, quick: bool, steps: int) -> None:
    """In a fresh process (so freed memory of other variants cannot hide the peak): build the
    base and one variant, run its training steps, print the result as one JSON line."""
    from transformers import LlamaForCausalLM

    config = model_config(quick)
    torch.manual_seed(0)
    variant = next(v for v in registry_variants() if v.label == label)
    model = build_variant(LlamaForCausalLM(config), variant, copy_base=False)
    seconds, peak = train_step(model, config.vocab_size, steps)
    print(json.dumps({"train_step_s": seconds, "train_peak_mib": peak}))


def run_train_child(label: str, quick: bool, steps: int) -> dict[str, float]:
    command = [sys.executable, __file__, "--train-child", label, "--train-steps", str(steps)]
    done = subprocess.run(
        [*command, *(["--quick"] if quick else [])], check=True, capture_output=True, text=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def mixed_batch(base: torch.nn.Module, rounds: int, reps: int, vocab: int) -> dict[str, Any]:
    """8 Houlsby adapters: a 16 x 1 batch routed round-robin vs the same batch on one."""
    import tilpass
    from tilpass.methods.bottleneck import BottleneckConfig

    model = tilpass.get_peft_model(
        copy.deepcopy(base), BottleneckConfig(bottleneck_size=BOTTLENECK), "a0"
    )
    for i in range(1, 8):
        model.add_adapter(f"a{i}", BottleneckConfig(bottleneck_size=BOTTLENECK))
    with torch.no_grad():
        for i in range(8):
            for param in model.adapter_parameters(f"a{i}"):
                param.add_(torch.randn_like(param) * 0.02)
    model.set_adapter("a0")
    ids = torch.randint(3, vocab, (16, 1))
    names = [f"a{i % 8}" for i in range(16)]

    def one() -> None:
        with torch.inference_mode():
            model(input_ids=ids)

    def mixed() -> None:
        with torch.inference_mode():
            model(input_ids=ids, adapter_names=names)

    seconds = interleaved_rounds({"one": timer(one, reps), "mixed": timer(mixed, reps)}, rounds)
    return {"seconds": seconds, "one_over_mixed": per_round_ratio(seconds["one"], seconds["mixed"])}


def peer_python(venv: Path) -> Path:
    """The python of AdapterHub's virtualenv, created on first use (torch from this env)."""
    python = venv / "bin" / "python"
    if not (venv / ".ready").exists():
        log(f"creating {venv} (adapters 1.3 + transformers 4.57)")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "adapters==1.3.0"], check=True)
        site = subprocess.run(
            [str(python), "-c", "import site; print(site.getsitepackages()[0])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        torch_site = Path(torch.__file__).resolve().parents[1]
        # A .pth entry is appended after the venv's own site-packages: its transformers wins,
        # torch (which the venv lacks) comes from here.
        (Path(site) / "bench_torch.pth").write_text(f"{torch_site}\n")
        (venv / ".ready").write_text("ok\n")
    return python


def run_peer(venv: Path, config: Any, rounds: int, reps: int) -> dict[str, Any]:
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    spec = {
        "model": {
            **{k: getattr(config, k) for k in keys},
            "num_key_value_heads": config.num_key_value_heads,
            "vocab_size": config.vocab_size,
            "tie_word_embeddings": False,
        },
        "bottleneck_size": BOTTLENECK,
        "shapes": SHAPES,
        "rounds": rounds,
        "reps": reps,
        "threads": torch.get_num_threads(),
    }
    with tempfile.TemporaryDirectory(prefix="bench-peer-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "peer.json"
        spec_path.write_text(json.dumps(spec))
        script = Path(__file__).resolve().parent / "adapterhub_peer.py"
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        subprocess.run(
            [str(peer_python(venv)), str(script), "--spec", str(spec_path), "--out", str(out_path)],
            check=True,
            env=env,
        )
        return json.loads(out_path.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller model (hidden 512)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=3)
    parser.add_argument("--json", default=None)
    parser.add_argument("--no-peer", action="store_true", help="skip the AdapterHub run")
    parser.add_argument("--train-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--adalora-only", action="store_true", help="only the AdaLoRA step comparison"
    )
    parser.add_argument(
        "--peer-venv", default=str(Path.home() / ".cache/tilpass/bench-adapterhub-venv")
    )
    args = parser.parse_args()
    if args.train_child is not None:
        train_child(args.train_child, args.quick, args.train_steps)
        return
    from transformers import LlamaForCausalLM

    config = model_config(args.quick)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).eval()
    if args.adalora_only:
        print(f"\n{machine_line(machine_info())}")
        print_adalora(adalora_steps(base, config.vocab_size, args.rounds))
        return
    base_params = sum(p.numel() for p in base.parameters())
    variants = registry_variants()
    models: dict[str, Any] = {"base": base}
    rows: dict[str, dict[str, Any]] = {}
    for variant in variants:
        model = build_variant(base, variant)
        models[variant.label] = model
        extra = 0 if variant.merged else sum(p.numel() for p in model.adapter_parameters("default"))
        rows[variant.label] = {"extra_pct": 100 * extra / base_params}
        if not variant.merged:
            rows[variant.label]["file_mb"] = adapter_file_bytes(model) / 1e6
    log(f"built {len(variants)} variants: {', '.join(rows)}")
    seconds = latency(models, config.vocab_size, args.rounds, args.reps)
    for label in rows:
        for shape, series in seconds.items():
            rows[label][shape] = per_round_ratio(series[label], series["base"])
    models.clear()
    gc.collect()
    for variant in variants:
        if not variant.merged:
            result = run_train_child(variant.label, args.quick, args.train_steps)
            rows[variant.label].update(result)
            log(f"train step {variant.label}: {result}")
    mixed = mixed_batch(base, args.rounds, args.reps, config.vocab_size)
    peer = None if args.no_peer else run_peer(Path(args.peer_venv), config, args.rounds, args.reps)
    report(args, config, base_params, rows, seconds, mixed, peer)
    print_adalora(adalora_steps(base, config.vocab_size, args.rounds))


def peer_rows(peer: dict[str, Any]) -> tuple[list[list[str]], list[Gate]]:
    """Rows and gates of the AdapterHub comparison: per shape, both libraries' ratios to the
    shared base model and tilpass / AdapterHub, all per-round ratios from the peer process."""
    table, gates = [], []
    for label, name in (("Houlsby", "houlsby"), ("Pfeiffer", "pfeiffer")):
        for shape, series in peer["seconds"].items():
            mine, theirs = series[f"tilpass {name}"], series[f"AdapterHub {name}"]
            rel = per_round_ratio(mine, theirs)
            table.append(
                [
                    label,
                    shape,
                    str(per_round_ratio(mine, series["base"])),
                    str(per_round_ratio(theirs, series["base"])),
                    str(rel),
                ]
            )
            gates.append(Gate(f"{label} {shape} tilpass / AdapterHub", rel.median, 1.0, "<="))
    return table, gates


def report(
    args: argparse.Namespace,
    config: Any,
    base_params: int,
    rows: dict[str, dict[str, Any]],
    seconds: dict[str, Any],
    mixed: dict[str, Any],
    peer: dict[str, Any] | None,
) -> None:
    info = machine_info()
    info["tilpass"] = __import__("tilpass").__version__
    shapes = list(seconds)
    headers = ["variant", "extra params %", *[f"{s} / base" for s in shapes]]
    headers += ["train step s", "train peak MiB", "file MB"]
    table = []
    for label, row in rows.items():
        cells = [label, f"{row['extra_pct']:.3f}", *[str(row[s]) for s in shapes]]
        for key, fmt in (
            ("train_step_s", "{:.3f}"),
            ("train_peak_mib", "{:.0f}"),
            ("file_mb", "{:.2f}"),
        ):
            cells.append(fmt.format(row[key]) if key in row else "-")
        table.append(cells)
    gates = [
        Gate("Houlsby 1x1 / base", rows["Houlsby"]["1x1"].median, 1.07, "<="),
        Gate("LoRA merged 1x1 / base", rows["LoRA merged"]["1x1"].median, 1.01, "<="),
        Gate(
            "8 bottleneck adapters mixed, tokens/s vs one",
            mixed["one_over_mixed"].median,
            0.85,
            ">=",
        ),
    ]
    print(f"\n{machine_line(info)}")
    print(
        f"model: hidden {config.hidden_size}, {config.num_hidden_layers} layers, "
        f"{base_params / 1e6:.1f}M parameters; rounds {args.rounds} x reps {args.reps}\n"
    )
    print(markdown_table(headers, table))
    print(
        f"\nmixed batch 16x1, 8 Houlsby adapters, tokens/s mixed / one: {mixed['one_over_mixed']}"
    )
    if peer is not None:
        peer_table, peer_gates = peer_rows(peer)
        print(f"\nAdapterHub {peer['versions']}, one process, shared base weights")
        print(f"logits vs tilpass (max abs diff / max abs): {peer['logit_rel_error']}\n")
        print(
            markdown_table(
                ["variant", "shape", "tilpass / base", "AdapterHub / base", "tilpass / AdapterHub"],
                peer_table,
            )
        )
        gates += peer_gates
    print("\n" + "\n".join(g.line() for g in gates))
    if args.json:
        write_json(
            args.json,
            {
                "machine": info,
                "rows": rows,
                "seconds": seconds,
                "mixed": mixed,
                "peer": peer,
                "gates": gates,
            },
        )


if __name__ == "__main__":
    main()
