"""Core LoRA benchmark: tilpass against PEFT and against the merged / base model.

A random-weight Llama-style model (hidden 1024, MLP 2816, 8 layers, 16 heads, vocab 32000,
fp32, seed 0) with LoRA r=16, alpha 32 on q,k,v,o,gate,up,down. Adapters have non-zero B and
are written once as PEFT-format files; tilpass and PEFT load the same files. Every model reads
the same base weight tensors (neither library copies them). The merged model is the base model
timed while tilpass has merged the adapter into those tensors in place (`merge_adapter` before,
`unmerge_adapter` after, both untimed): that is what `merge_and_unload` returns, without a
second copy of the weights whose place in memory alone moves speed by a few per cent. The
single-adapter forwards run in two phases per round (unmerged: tilpass, PEFT, base; merged:
merged, tilpass after `merge_adapter`), and a variant's time in a round is the fastest of its
calls (other work on a shared machine only adds time).

Every comparison runs all its variants in this one process, in interleaved rounds with a
rotating order, and gates on the median of the per-round ratios (benchmarks/common.py). Each
speed check is preceded by a check that the logits match PEFT's within 1e-4 (relative to the
largest logit, whole tensor).

    python benchmarks/bench_lora.py --json results/bench_lora.json
    python benchmarks/bench_lora.py --quick          # smoke run, a couple of minutes
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    Gate,
    Phase,
    Timer,
    best_timer,
    core_llama_config,
    interleaved_rounds,
    machine_info,
    machine_line,
    markdown_table,
    median,
    per_round_ratio,
    phased_rounds,
    rel_error,
    shared_copy,
    time_call,
    write_json,
)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 16, 32
TOL = 1e-4
VOCAB = 32000


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- model and adapter files
def build_base() -> nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(core_llama_config()).eval()


def write_adapter(directory: Path, model: nn.Module, seed: int) -> int:
    """Write a PEFT-format LoRA adapter with random A and small random B; returns file bytes."""
    from peft import LoraConfig as PeftLoraConfig

    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS:
            bound = 1 / math.sqrt(module.in_features)
            a = (torch.rand(RANK, module.in_features, generator=gen) * 2 - 1) * bound
            b = torch.randn(module.out_features, RANK, generator=gen) * 0.01
            tensors[f"base_model.model.{name}.lora_A.weight"] = a
            tensors[f"base_model.model.{name}.lora_B.weight"] = b
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    PeftLoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, task_type="CAUSAL_LM"
    ).save_pretrained(str(directory))
    return (directory / "adapter_model.safetensors").stat().st_size


def param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


# -- calls
def ids_of(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def round_robin(names: list[str], rows: int) -> list[str]:
    return [names[i % len(names)] for i in range(rows)]


def forward_fn(model: nn.Module, ids: torch.Tensor, **kw: Any) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        with torch.inference_mode():
            return model(input_ids=ids, **kw).logits

    return run


def generate_fn(
    model: nn.Module, ids: torch.Tensor, new_tokens: int, **kw: Any
) -> Callable[[], Any]:
    mask = torch.ones_like(ids)

    def run() -> Any:
        with torch.inference_mode():
            return model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
                return_dict_in_generate=True,
                output_logits=True,
                **kw,
            )

    return run


def random_cache(config: Any, batch: int, length: int) -> Any:
    """A DynamicCache holding `length` tokens of random keys/values for every layer."""
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    heads = config.num_key_value_heads
    head_dim = config.hidden_size // config.num_attention_heads
    gen = torch.Generator().manual_seed(7)
    for layer in range(config.num_hidden_layers):
        k = torch.randn(batch, heads, length, head_dim, generator=gen)
        v = torch.randn(batch, heads, length, head_dim, generator=gen)
        cache.update(k, v, layer)
    return cache


def decode_timer(
    model: nn.Module, ids: torch.Tensor, cache: Any, reps: int, **kw: Any
) -> tuple[Timer, Callable[[], torch.Tensor]]:
    """A timer for one decode step on a fresh copy of `cache` (the copy is untimed)."""
    holder: list[Any] = []

    def setup() -> None:
        holder[:] = [copy.deepcopy(cache)]

    def step() -> torch.Tensor:
        with torch.inference_mode():
            return model(input_ids=ids, cache=holder[0], use_cache=True, **kw).logits

    def once() -> torch.Tensor:
        setup()
        return step()

    return (lambda: time_call(step, reps, setup)), once


# -- the benchmark
class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.gates: list[Gate] = []
        self.checks: list[dict[str, Any]] = []
        self.results: dict[str, Any] = {}

    def check(self, what: str, actual: torch.Tensor, reference: torch.Tensor) -> float:
        err = rel_error(actual, reference)
        ok = err <= TOL
        self.checks.append({"what": what, "rel_error": err, "passed": ok})
        log(f"check {what}: rel error {err:.2e} {'ok' if ok else 'MISMATCH'}")
        if not ok:
            raise SystemExit(f"output mismatch ({what}): rel error {err:.2e} > {TOL}")
        return err

    def gate(self, name: str, value: float, limit: float, op: str, detail: str = "") -> None:
        g = Gate(name, value, limit, op, detail)
        self.gates.append(g)
        log(g.line())

    def rounds(self, variants: dict[str, Timer], rounds: int, label: str) -> dict[str, list[float]]:
        log(f"{label}: {len(variants)} variants x {rounds} rounds")
        return interleaved_rounds(
            variants, rounds, warmup=self.args.warmup, progress=lambda m: log(f"  {label} {m}")
        )

    # -- setup
    def setup(self) -> None:
        from peft import PeftModel as PeftPeftModel

        from tilpass import AdaptedModel

        a = self.args
        log("building the base model")
        self.base = build_base()
        self.base_bytes = param_bytes(self.base)
        self.n_max = max(a.counts)
        self.names = [f"a{i:02d}" for i in range(self.n_max)]
        root = Path(a.workdir or tempfile.mkdtemp(prefix="bench_lora_"))
        log(f"writing {self.n_max + 1} PEFT-format adapters to {root}")
        sizes = [write_adapter(root / n, self.base, 1000 + i) for i, n in enumerate(self.names)]
        self.adapter_bytes = sizes[0]
        self.load_dir = root / "to_load"
        self.load_bytes = write_adapter(self.load_dir, self.base, 999)
        self.dirs = {n: root / n for n in self.names}
        for d in [*self.dirs.values(), self.load_dir]:  # page-cache the files
            (d / "adapter_model.safetensors").read_bytes()
        adapter_params = sum(t.numel() for t in self._peek(self.dirs[self.names[0]]).values())
        self.results["model"] = {
            "base_params": sum(p.numel() for p in self.base.parameters()),
            "base_bytes": self.base_bytes,
            "adapter_params": adapter_params,
            "adapter_file_bytes": self.adapter_bytes,
            "load_adapter_file_bytes": self.load_bytes,
        }

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            log("tilpass models with N adapters (shared base weights)")
            self.tp: dict[int, Any] = {}
            for n in a.counts:
                model = AdaptedModel(shared_copy(self.base))
                for name in self.names[:n]:
                    model.load_adapter(self.dirs[name], name)
                model.set_adapter(self.names[0])
                self.tp[n] = model.eval()
            log("PEFT model with all adapters (shared base weights)")
            self.peft = PeftPeftModel.from_pretrained(
                shared_copy(self.base), str(self.dirs[self.names[0]]), adapter_name=self.names[0]
            )
            for name in self.names[1:]:
                self.peft.load_adapter(str(self.dirs[name]), adapter_name=name)
            self.peft.set_adapter(self.names[0])
            self.peft.eval()

    @staticmethod
    def _peek(directory: Path) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(directory / "adapter_model.safetensors"))

    # -- 1. single adapter, unmerged vs merged vs PEFT vs base
    def single(self) -> None:
        a = self.args
        tp = self.tp[1] if 1 in self.tp else self.tp[min(self.tp)]
        out: dict[str, Any] = {}
        for batch, length in a.shapes:
            label = f"{batch}x{length}"
            ids = ids_of(batch, length, seed=batch * 1000 + length)
            reps = a.reps if batch * length <= 64 else a.long_reps
            unmerged = {
                "tilpass_unmerged": forward_fn(tp, ids),
                "peft_unmerged": forward_fn(self.peft, ids),
                "base": forward_fn(self.base, ids),
            }
            merged = {
                "merged": forward_fn(self.base, ids),
                "tilpass_merge_adapter": forward_fn(tp, ids),
            }
            first = self.check_single(label, tp, unmerged, merged)
            phases = [
                Phase({k: best_timer(f, reps) for k, f in unmerged.items()}),
                Phase(
                    {k: best_timer(f, reps) for k, f in merged.items()},
                    enter=tp.merge_adapter,
                    leave=tp.unmerge_adapter,
                ),
            ]
            rounds = a.rounds if batch * length <= 64 else a.long_rounds
            log(f"single {label}: 2 phases, 5 variants x {rounds} rounds")
            s = phased_rounds(
                phases, rounds, self.args.warmup, lambda m, lb=label: log(f"  single {lb} {m}")
            )
            drift = rel_error(unmerged["tilpass_unmerged"](), first)
            if drift > 1e-5:
                raise SystemExit(f"merge / unmerge drifted the weights: logits moved {drift:.2e}")
            tokens = batch * length
            r_merged = per_round_ratio(s["tilpass_unmerged"], s["merged"])
            r_peft = per_round_ratio(s["tilpass_unmerged"], s["peft_unmerged"])
            r_base = per_round_ratio(s["merged"], s["base"])
            r_tpm = per_round_ratio(s["tilpass_merge_adapter"], s["merged"])
            self.gate(f"unmerged/merged {label}", r_merged.median, 1.05, "<=", str(r_merged))
            self.gate(f"tilpass/PEFT unmerged {label}", r_peft.median, 1.00, "<=", str(r_peft))
            self.gate(f"merged/base {label}", r_base.median, 1.01, "<=", str(r_base))
            out[label] = {
                "seconds": s,
                "median_ms": {k: 1e3 * median(v) for k, v in s.items()},
                "tokens_per_s": {k: tokens / median(v) for k, v in s.items()},
                "ratios": {
                    "unmerged/merged": r_merged,
                    "tilpass/peft_unmerged": r_peft,
                    "merged/base": r_base,
                    "tilpass_merge_adapter/merged (info)": r_tpm,
                },
            }
        self.results["single"] = out

    def check_single(
        self,
        label: str,
        tp: Any,
        unmerged: dict[str, Callable[[], torch.Tensor]],
        merged: dict[str, Callable[[], torch.Tensor]],
    ) -> torch.Tensor:
        """Every variant's logits against PEFT's, the merged ones with the adapter merged in
        place; returns tilpass's unmerged logits (to check for drift after timing)."""
        ref = unmerged["peft_unmerged"]()
        first = unmerged["tilpass_unmerged"]()
        self.check(f"single {label} tilpass_unmerged vs PEFT", first, ref)
        if rel_error(unmerged["base"](), ref) < 1e-3:
            raise SystemExit("the adapter does not change the logits: nothing would be measured")
        tp.merge_adapter()
        try:
            for key, fn in merged.items():
                self.check(f"single {label} {key} vs PEFT", fn(), ref)
        finally:
            tp.unmerge_adapter()
        return first

    # -- 2. mixed batch of 8 adapters
    def mixed(self) -> None:
        a = self.args
        n = 8 if 8 in self.tp else max(self.tp)
        tp = self.tp[n]
        names = self.names[:n]
        out: dict[str, Any] = {}
        cases: list[tuple[str, int, Callable[..., Callable[[], Any]], int]] = [
            (f"forward {b}x1", b, lambda m, ids, **kw: forward_fn(m, ids, **kw), b)
            for b in a.mixed_batches
        ]
        cases.append(
            (
                f"generate {a.gen_rows}x{a.gen_tokens}",
                a.gen_rows,
                lambda m, ids, **kw: generate_fn(m, ids, a.gen_tokens, **kw),
                a.gen_rows * a.gen_tokens,
            )
        )
        for label, rows, make, tokens in cases:
            is_gen = label.startswith("generate")
            ids = ids_of(rows, a.gen_prompt if is_gen else 1, seed=rows + 17)
            mix = round_robin(names, rows)
            fns = {
                "tilpass_one_adapter": make(tp, ids),
                "tilpass_mixed": make(tp, ids, adapter_names=mix),
                "peft_mixed": make(self.peft, ids, adapter_names=mix),
            }
            t_mix, p_mix = fns["tilpass_mixed"](), fns["peft_mixed"]()
            if is_gen:
                same = (t_mix.sequences == p_mix.sequences).float().mean().item()
                log(f"generate: tilpass and PEFT tokens agree on {100 * same:.1f}%")
                out.setdefault("generate_token_agreement", same)
                self.check(
                    f"mixed {label} step logits",
                    torch.stack(t_mix.logits),
                    torch.stack(p_mix.logits),
                )
            else:
                self.check(f"mixed {label} tilpass vs PEFT", t_mix, p_mix)
            fns["tilpass_one_adapter"]()
            reps = 1 if is_gen else a.reps
            timers = {k: (lambda f=f, r=reps: time_call(f, r)) for k, f in fns.items()}
            rounds = a.gen_rounds if is_gen else a.mixed_rounds
            s = self.rounds(timers, rounds, f"mixed {label}")
            # tokens/s ratio a/b == time ratio b/a on the same inputs
            r_one = per_round_ratio(s["tilpass_one_adapter"], s["tilpass_mixed"])
            r_peft = per_round_ratio(s["peft_mixed"], s["tilpass_mixed"])
            self.gate(f"mixed/one-adapter tok/s {label}", r_one.median, 0.85, ">=", str(r_one))
            self.gate(f"mixed tilpass/PEFT tok/s {label}", r_peft.median, 1.25, ">=", str(r_peft))
            out[label] = {
                "seconds": s,
                "median_ms": {k: 1e3 * median(v) for k, v in s.items()},
                "tokens_per_s": {k: tokens / median(v) for k, v in s.items()},
                "ratios": {"mixed/one_adapter tok/s": r_one, "tilpass/peft mixed tok/s": r_peft},
            }
        self.results["mixed"] = out

    # -- 3. adapter-count scaling in a decode step
    def scaling(self) -> None:
        a = self.args
        rows = a.scale_rows
        ids = ids_of(rows, 1, seed=99)
        cache = random_cache(self.base.config, rows, a.cache_len)
        f = self.adapter_bytes / self.base_bytes
        timers: dict[str, Timer] = {}
        for n in a.counts:
            mix = round_robin(self.names[:n], rows)
            t, once = decode_timer(self.tp[n], ids, cache, a.reps, adapter_names=mix)
            _, peft_once = decode_timer(self.peft, ids, cache, 1, adapter_names=mix)
            self.check(f"decode {rows}x1 N={n} tilpass vs PEFT", once(), peft_once())
            timers[f"N={n}"] = t
        s = self.rounds(timers, a.scale_rounds, f"scaling decode {rows}x1 cache {a.cache_len}")
        out: dict[str, Any] = {"f": f, "seconds": s, "per_n": {}}
        first = f"N={a.counts[0]}"
        for n in a.counts:
            key = f"N={n}"
            speed = per_round_ratio(s[first], s[key])  # tokens/s ratio to N=1
            bound = (1 + f) / (1 + n * f)
            value = speed.median / bound
            self.gate(
                f"scaling {key} (tok/s ratio / bound)",
                value,
                0.90,
                ">=",
                f"tok/s ratio {speed}, bound {bound:.3f}",
            )
            out["per_n"][key] = {
                "median_ms": 1e3 * median(s[key]),
                "tokens_per_s": rows / median(s[key]),
                "tok_s_ratio_to_first": speed,
                "bound": bound,
                "ratio_over_bound": value,
            }
        self.results["scaling"] = out

    # -- 4. loading and switching
    def loading(self) -> None:
        a = self.args
        n = max(self.tp)
        tp = self.tp[n]
        counter = {"tilpass": 0, "peft": 0}
        probe = ids_of(1, 4, seed=5)
        first_forward: dict[str, list[float]] = {"tilpass": [], "peft": []}

        def load_once(lib: str, check: bool = False) -> float:
            counter[lib] += 1
            name = f"ld{counter[lib]}"
            model = tp if lib == "tilpass" else self.peft
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                start = time.perf_counter()
                if lib == "tilpass":
                    tp.load_adapter(self.load_dir, name)
                else:
                    self.peft.load_adapter(str(self.load_dir), adapter_name=name)
                elapsed = time.perf_counter() - start
            # it can serve: a forward with the new adapter works (timed for information)
            start = time.perf_counter()
            logits = forward_fn(model, probe, adapter_names=[name])()
            first_forward[lib].append(time.perf_counter() - start)
            if check:
                self.results.setdefault("_load_logits", {})[lib] = logits
            model.delete_adapter(name)
            return elapsed

        load_once("tilpass", check=True)
        load_once("peft", check=True)
        logits = self.results.pop("_load_logits")
        self.check("loaded adapter tilpass vs PEFT", logits["tilpass"], logits["peft"])
        for v in first_forward.values():
            v.clear()
        s_load = self.rounds(
            {"tilpass": lambda: load_once("tilpass"), "peft": lambda: load_once("peft")},
            a.load_rounds,
            "load_adapter",
        )
        r_load = per_round_ratio(s_load["tilpass"], s_load["peft"])
        self.gate("load_adapter tilpass/PEFT", r_load.median, 0.25, "<=", str(r_load))

        pair = self.names[:2]

        def switch(model: Any) -> Callable[[], float]:
            def run() -> float:
                total = 0.0
                for i in range(a.switch_reps):
                    start = time.perf_counter()
                    model.set_adapter(pair[i % 2])
                    total += time.perf_counter() - start
                model.set_adapter(pair[0])
                return total / a.switch_reps

            return run

        s_set = self.rounds(
            {"tilpass": switch(tp), "peft": switch(self.peft)}, a.load_rounds, "set_adapter"
        )
        r_set = per_round_ratio(s_set["tilpass"], s_set["peft"])
        self.gate("set_adapter tilpass/PEFT", r_set.median, 0.10, "<=", str(r_set))
        self.results["loading"] = {
            "adapter_file_bytes": self.load_bytes,
            "load_seconds": s_load,
            "load_median_ms": {k: 1e3 * median(v) for k, v in s_load.items()},
            "first_forward_1x4_median_ms (info)": {
                k: 1e3 * median(v) for k, v in first_forward.items() if v
            },
            "load_ratio": r_load,
            "set_adapter_seconds": s_set,
            "set_adapter_median_ms": {k: 1e3 * median(v) for k, v in s_set.items()},
            "set_adapter_ratio": r_set,
        }


# -- report
def report(bench: Bench, info: dict[str, Any], command: str) -> str:
    r = bench.results
    lines = [f"command: {command}", f"machine: {machine_line(info)}"]
    m = r["model"]
    lines.append(
        f"model: {m['base_params'] / 1e6:.1f}M params ({m['base_bytes'] / 2**20:.0f} MiB fp32); "
        f"adapter r={RANK}: {m['adapter_params'] / 1e6:.2f}M params, file "
        f"{m['adapter_file_bytes'] / 1e6:.2f} MB"
    )
    if "single" in r:
        rows = []
        for label, d in r["single"].items():
            ms, rt = d["median_ms"], d["ratios"]
            rows.append(
                [
                    label,
                    *(f"{ms[k]:.1f}" for k in ("tilpass_unmerged", "peft_unmerged", "merged")),
                    f"{ms['base']:.1f}",
                    f"{ms['tilpass_merge_adapter']:.1f}",
                    *(str(rt[k]) for k in rt),
                ]
            )
        lines += [
            "",
            "single adapter, forward (median ms; ratios: median [min-max] of per-round ratios)",
            markdown_table(
                [
                    "batch",
                    "tilpass",
                    "PEFT",
                    "merged",
                    "base",
                    "tp merge_adapter",
                    "unmerged/merged",
                    "tilpass/PEFT",
                    "merged/base",
                    "merge_adapter/merged",
                ],
                rows,
            ),
        ]
    if "mixed" in r:
        rows = []
        for label, d in r["mixed"].items():
            if not isinstance(d, dict):
                continue
            tps, rt = d["tokens_per_s"], d["ratios"]
            rows.append(
                [
                    label,
                    *(f"{tps[k]:.1f}" for k in ("tilpass_one_adapter", "tilpass_mixed")),
                    f"{tps['peft_mixed']:.1f}",
                    *(str(rt[k]) for k in rt),
                ]
            )
        lines += [
            "",
            "mixed batch, 8 adapters round-robin (tokens/s from median times)",
            markdown_table(
                [
                    "case",
                    "tilpass one adapter",
                    "tilpass mixed",
                    "PEFT mixed",
                    "mixed/one",
                    "tilpass/PEFT",
                ],
                rows,
            ),
        ]
    if "scaling" in r:
        d = r["scaling"]
        rows = [
            [
                k,
                f"{v['median_ms']:.1f}",
                f"{v['tokens_per_s']:.1f}",
                str(v["tok_s_ratio_to_first"]),
                f"{v['bound']:.3f}",
                f"{v['ratio_over_bound']:.3f}",
            ]
            for k, v in d["per_n"].items()
        ]
        lines += [
            "",
            f"adapter-count scaling, decode step (f = {d['f']:.4f})",
            markdown_table(
                ["N", "median ms", "tok/s", "tok/s vs N=1", "bound", "ratio/bound"], rows
            ),
        ]
    if "loading" in r:
        d = r["loading"]
        lm, sm, ff = (
            d["load_median_ms"],
            d["set_adapter_median_ms"],
            d["first_forward_1x4_median_ms (info)"],
        )
        lines += [
            "",
            f"loading a {d['adapter_file_bytes'] / 1e6:.2f} MB adapter (page-cached), median ms",
            markdown_table(
                ["operation", "tilpass", "PEFT", "tilpass/PEFT"],
                [
                    [
                        "load_adapter",
                        f"{lm['tilpass']:.2f}",
                        f"{lm['peft']:.2f}",
                        str(d["load_ratio"]),
                    ],
                    [
                        "first forward 1x4 after load (info)",
                        f"{ff.get('tilpass', float('nan')):.1f}",
                        f"{ff.get('peft', float('nan')):.1f}",
                        "-",
                    ],
                    [
                        "set_adapter",
                        f"{sm['tilpass']:.3f}",
                        f"{sm['peft']:.3f}",
                        str(d["set_adapter_ratio"]),
                    ],
                ],
            ),
        ]
    lines += ["", "gates"]
    lines += [g.line() for g in bench.gates]
    passed = sum(g.passed for g in bench.gates)
    lines.append(f"{passed}/{len(bench.gates)} gates pass")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=15, help="rounds for 16x1 / 64x1 forwards")
    p.add_argument("--long-rounds", type=int, default=15, help="rounds for the 8x128 forward")
    p.add_argument("--long-reps", type=int, default=1, help="calls per variant per round (8x128)")
    p.add_argument("--mixed-rounds", type=int, default=9, help="rounds, mixed-batch forwards")
    p.add_argument("--gen-rounds", type=int, default=5, help="rounds, mixed-batch generate")
    p.add_argument("--scale-rounds", type=int, default=9, help="rounds, adapter-count scaling")
    p.add_argument("--load-rounds", type=int, default=15, help="rounds, load/set_adapter")
    p.add_argument("--reps", type=int, default=2, help="calls per variant per round (small)")
    p.add_argument("--switch-reps", type=int, default=50, help="set_adapter calls per round")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up rounds")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--quick", action="store_true", help="smoke run: few rounds, small shapes")
    p.add_argument(
        "--only",
        nargs="+",
        choices=["single", "mixed", "scaling", "loading"],
        default=["single", "mixed", "scaling", "loading"],
    )
    p.add_argument("--json", type=Path, help="write machine-readable results here")
    p.add_argument("--workdir", type=Path, help="where to write the adapter files (temp dir)")
    args = p.parse_args(argv)
    args.shapes = [(16, 1), (64, 1), (8, 128)]
    args.mixed_batches = [16, 64]
    args.gen_rows, args.gen_tokens, args.gen_prompt = 16, 16, 8
    args.counts = [1, 2, 4, 8, 16, 32]
    args.scale_rows, args.cache_len = 64, 32
    if args.quick:
        args.rounds = args.long_rounds = args.mixed_rounds = 2
        args.gen_rounds = args.scale_rounds = 1
        args.load_rounds, args.switch_reps = 3, 10
        args.reps, args.warmup = 1, 0
        args.shapes = [(16, 1), (64, 1), (8, 16)]
        args.gen_tokens = 4
        args.counts = [1, 8]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python benchmarks/bench_lora.py " + " ".join(sys.argv[1:] if argv is None else argv)
    start = time.perf_counter()
    bench = Bench(args)
    bench.setup()
    for section in ("single", "mixed", "scaling", "loading"):
        if section in args.only:
            getattr(bench, section)()
    info = machine_info()
    info["tilpass"] = __import__("tilpass").__version__
    text = report(bench, info, command)
    print(text)
    elapsed = time.perf_counter() - start
    print(f"total {elapsed:.0f} s")
    if args.json:
        write_json(
            args.json,
            {
                "command": command,
                "machine": info,
                "settings": {k: v for k, v in vars(args).items() if k not in ("json", "workdir")},
                "results": bench.results,
                "checks": bench.checks,
                "gates": bench.gates,
                "all_pass": all(g.passed for g in bench.gates),
                "elapsed_s": elapsed,
                "table": text,
            },
        )
        json.loads(args.json.read_text())  # it parses
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
