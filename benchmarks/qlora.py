"""QLoRA benchmark: the 4-bit base's size, its bytes against bitsandbytes', speed against PEFT +
bitsandbytes and against fp32, and quickstart quality against 16/32-bit LoRA.

Sections (each on the core benchmark's random Llama, `common.core_llama_config()`, and on the
default model, SmolLM2-135M-Instruct, where the section says so):

1. storage: bits per quantized weight measured from the stored tensors, and the resident
   bytes of the whole base in fp32, bf16 and NF4 (double quantization, blocks of 64);
2. bytes: the packed NF4 data and the block scales of a 4096 x 4096 N(0, 1) tensor quantized
   by tilpass (`quantize_linear`) against `bitsandbytes.functional.quantize_4bit` (blocksize
   64, double quantization), compared with `torch.equal`;
3. speed: a QLoRA training step (forward, backward, AdamW step; batch 4 x 128) and a decode
   step (one token with a 128-token KV cache, batch 1), tilpass against PEFT's own
   bitsandbytes LoRA layer on a copy of the same quantized model, LoRA r=16, alpha 32 on
   q_proj, v_proj, the same non-zero adapter values; and the 4-bit decode step against the
   same model in fp32, with the time of dequantizing every 4-bit weight once (the floor of a
   dequantize-then-matmul kernel) beside it;
4. quality (`--sections quickstart`, long): `tilpass quickstart`'s run (SmolLM2, 120 steps x 8,
   seed 0) with LoRA over the fp32 base and over the NF4 base, held-out exact match of both.

Time: interleaved rounds, the order rotating; ratios are medians of per-round ratios.

    python benchmarks/qlora.py --json qlora.json                          # sections 1-3
    python benchmarks/qlora.py --sections quickstart --json quick.json    # section 4 (long)
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
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
    median,
    per_round_ratio,
    timer,
    write_json,
)

RANK, ALPHA, TARGETS = 16, 32, ["q_proj", "v_proj"]
BATCH, LENGTH, CACHE = 4, 128, 128


def random_model(dtype: torch.dtype = torch.float32) -> nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(core_llama_config()).to(dtype).eval()


def default_model(dtype: torch.dtype = torch.float32) -> nn.Module:
    from tilpass.pretrained import load_model

    return load_model(dtype=dtype)[0]


def storage_section(build: Any, label: str) -> dict[str, Any]:
    """Resident bytes of the whole base in fp32, bf16 and NF4, and NF4's bits per weight."""
    from tilpass.quantize import measure_storage, quantize_model

    out: dict[str, Any] = {"model": label}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        out[f"{name}_bytes"] = measure_storage(build(dtype)).total_bytes
    model = build(torch.float32)
    report = quantize_model(model)
    storage = measure_storage(model)
    out |= {
        "nf4_bytes": storage.total_bytes,
        "nf4_quantized_bytes": storage.quantized_bytes,
        "nf4_quantized_weights": storage.quantized_weights,
        "bits_per_quantized_weight": storage.bits_per_quantized_weight,
        "bits_with_code_books": storage.bits_with_code_books,
        "code_book_bytes": storage.code_book_bytes,
        "kept": report.kept,
        "quantized_layers": len(report.quantized),
    }
    return out


def bytes_section() -> dict[str, Any]:
    """tilpass's NF4 bytes and scales of a 4096 x 4096 Gaussian tensor against bitsandbytes'."""
    import bitsandbytes.functional as bnbf

    from tilpass.quantize import QuantizeConfig, quantize_linear

    torch.manual_seed(0)
    weight = torch.randn(4096, 4096)
    linear = nn.Linear(4096, 4096, bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight)
    ours = quantize_linear(linear, QuantizeConfig("nf4")).weight
    data, state = bnbf.quantize_4bit(
        weight, blocksize=64, compress_statistics=True, quant_type="nf4"
    )
    mine = ours.quant_state
    return {
        "packed_equal": torch.equal(ours.data, data),
        "absmax_8bit_equal": torch.equal(mine.absmax, state.absmax),
        "nested_absmax_equal": torch.equal(mine.state2.absmax, state.state2.absmax),
        "offset_equal": bool(mine.offset == state.offset),
        "packed_bytes": data.numel() * data.element_size(),
    }


def adapters(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(tilpass, PEFT) LoRA models over two copies of the same quantized base, same values."""
    import peft
    from peft.utils import set_peft_model_state_dict

    import tilpass

    peft_base = copy.deepcopy(model)
    peft_base.is_loaded_in_4bit = True  # PEFT dispatches its bitsandbytes layer on this flag
    config = dict(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights=False)
    ours = tilpass.get_peft_model(model, tilpass.LoraConfig(**config))
    theirs = peft.get_peft_model(peft_base, peft.LoraConfig(**config))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in sorted(ours.named_parameters(), key=lambda kv: kv[0]):
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    result = set_peft_model_state_dict(theirs, ours.adapter_state_dict("default"))
    if result.unexpected_keys:
        raise RuntimeError(f"PEFT did not take the adapter values: {result.unexpected_keys[:3]}")
    return ours, theirs


def speed_section(rounds: int) -> dict[str, Any]:
    """Training and decode step, tilpass against PEFT + bitsandbytes, and 4-bit against fp32."""
    from tilpass.quantize import dequantize_weight, is_quantized_module, quantize_model

    fp32 = random_model()
    model = random_model()
    quantize_model(model)
    ours, theirs = adapters(model)
    ids = torch.randint(3, 32000, (BATCH, LENGTH), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = float((ours(ids[:1]).logits - theirs(ids[:1]).logits).abs().max())
    steps = {name: _train_step(m, ids) for name, m in (("tilpass", ours), ("peft", theirs))}
    decode = {
        name: _decode_step(m, ids[:1])
        for name, m in (("tilpass", ours), ("peft", theirs), ("fp32", fp32))
    }
    layers = [m for m in model.modules() if is_quantized_module(m)]

    def dequantize_all() -> None:
        for layer in layers:
            dequantize_weight(layer)

    variants = {f"train_{k}": timer(v) for k, v in steps.items()}
    variants |= {f"decode_{k}": timer(v, reps=3) for k, v in decode.items()}
    variants["dequantize_all"] = timer(dequantize_all)
    times = interleaved_rounds(variants, rounds)
    return {
        "max_logit_difference_vs_peft": diff,
        "median_s": {k: median(v) for k, v in times.items()},
        "train_vs_peft": per_round_ratio(times["train_tilpass"], times["train_peft"]),
        "decode_vs_peft": per_round_ratio(times["decode_tilpass"], times["decode_peft"]),
        "decode_4bit_vs_fp32": per_round_ratio(times["decode_tilpass"], times["decode_fp32"]),
        "dequantize_vs_decode": per_round_ratio(times["dequantize_all"], times["decode_tilpass"]),
    }


def _train_step(model: nn.Module, ids: torch.Tensor) -> Any:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    model.train()

    def step() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _decode_step(model: nn.Module, prompt: torch.Tensor) -> Any:
    """One token after a KV cache of `CACHE` tokens; the cache is cropped back after each
    step, so every step sees the same cache length."""
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.no_grad():
        model.eval()
        model(input_ids=prompt[:, :CACHE], past_key_values=cache, use_cache=True)
    token = prompt[:, -1:]

    def step() -> None:
        with torch.inference_mode():
            model(input_ids=token, past_key_values=cache, use_cache=True)
        cache.crop(-1)  # drop the token just added

    return step


def quickstart_section() -> dict[str, Any]:
    """The quickstart run with LoRA over fp32 and over NF4: exact match, same steps and seed."""
    from tilpass.cli import QUICKSTART, merge, shipped_data
    from tilpass.run import build_config, run

    out: dict[str, Any] = {}
    for label, quantize in (("lora", None), ("qlora", "nf4")):
        with tempfile.TemporaryDirectory(prefix=f"qlora-bench-{label}-") as tmp:
            values = merge(
                QUICKSTART,
                {
                    "output_dir": tmp,
                    "eval_before": False,
                    "quantize": quantize,
                    "training": {"progress_bar": False},
                    "data": {
                        "train": shipped_data("specialty_train.jsonl"),
                        "eval": shipped_data("specialty_test.jsonl"),
                    },
                },
            )
            started = time.perf_counter()
            result = run(build_config(values, "benchmark"), log=lambda _: None)
            out[label] = {
                "exact_match": result.after.get("exact_match"),
                "loss": result.after.get("loss"),
                "wall_s": time.perf_counter() - started,
            }
    return out


def gates(results: dict[str, Any]) -> list[Gate]:
    out = [
        Gate(f"bits/weight ({s['model']})", s["bits_per_quantized_weight"], 4.13, "<=")
        for s in results.get("storage", [])
    ]
    if "bytes" in results:
        same = all(results["bytes"][k] for k in ("packed_equal", "absmax_8bit_equal"))
        out.append(Gate("NF4 bytes identical to bitsandbytes", float(same), 1, ">="))
    speed = results.get("speed")
    if speed:
        out.append(Gate("QLoRA train step / PEFT+bnb", speed["train_vs_peft"].median, 1.0, "<="))
        out.append(Gate("QLoRA decode step / PEFT+bnb", speed["decode_vs_peft"].median, 1.0, "<="))
    quick = results.get("quickstart")
    if quick:
        gap = 100 * abs(quick["qlora"]["exact_match"] - quick["lora"]["exact_match"])
        out.append(Gate("exact match |QLoRA - LoRA| (points)", gap, 2.0, "<="))
    return out


SECTIONS = ("storage", "bytes", "speed", "quickstart")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument(
        "--sections", default="storage,bytes,speed", help=f"comma-separated: {', '.join(SECTIONS)}"
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    sections = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    torch.set_num_threads(2)
    info = machine_info(("torch", "transformers", "peft", "bitsandbytes", "tilpass"))
    results: dict[str, Any] = {"machine": info}
    if "storage" in sections:
        results["storage"] = [
            storage_section(random_model, "core"),
            storage_section(default_model, "SmolLM2-135M-Instruct"),
        ]
    if "bytes" in sections:
        results["bytes"] = bytes_section()
    if "speed" in sections:
        results["speed"] = speed_section(args.rounds)
    if "quickstart" in sections:
        results["quickstart"] = quickstart_section()
    results["gates"] = gates(results)
    print(machine_line(info))
    for key in SECTIONS:
        if key in results:
            print(key, results[key])
    for gate in results["gates"]:
        print(gate.line())
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
