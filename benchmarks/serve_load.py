"""Load test of `tilpass serve`: 16 concurrent clients on loopback, 1 / 4 / 16 adapters.

Side by side in one run, on the same requests (prompt lengths, output lengths):

- tilpass serve (a subprocess), driven from this process over HTTP with streamed completions:
  output tokens/s, p50 / p95 latency and time to first token, for each adapter mix;
- in-process batched `generate` (batches of `--clients` rows, each routed to its adapter);
- a naive baseline: each adapter's requests as a batch of their own, one after another;
- `transformers serve --continuous-batching` serving the base with adapter 0 merged (the
  peer that ships with transformers), driven by the same clients.

Every request asks for exactly `--max-tokens` tokens (`ignore_eos` on tilpass; the peer's
counts come from what it streams). Usage:

    python benchmarks/serve_load.py --json serve_load.json          # the default model
    python benchmarks/serve_load.py --tiny --requests-per-client 1  # a quick check
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch

import tilpass
from tilpass.pretrained import DEFAULT_MODEL, load_model, resolve_model_path

WORDS = [
    "the",
    "patient",
    "reports",
    "pain",
    "fever",
    "cough",
    "rash",
    "fatigue",
    "dizziness",
    "nausea",
    "since",
    "last",
    "week",
]


@dataclass
class Load:
    """What the clients ask for."""

    clients: int
    per_client: int
    prompt_words: int
    max_tokens: int

    def prompts(self) -> list[str]:
        """One prompt per request, all of the same length (words drawn with a fixed seed)."""
        generator = torch.Generator().manual_seed(0)
        total = self.clients * self.per_client
        picks = torch.randint(0, len(WORDS), (total, self.prompt_words), generator=generator)
        return [" ".join(WORDS[i] for i in row) for row in picks.tolist()]


@dataclass
class Result:
    """One system on one adapter mix."""

    system: str
    adapters: int
    tokens: int
    seconds: float
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    def row(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "system": self.system,
            "adapters": self.adapters,
            "tokens": self.tokens,
            "seconds": round(self.seconds, 3),
            "tokens_per_s": round(self.tokens_per_s, 1),
        }
        if self.latencies:
            out["p50_latency_s"] = round(percentile(self.latencies, 50), 3)
            out["p95_latency_s"] = round(percentile(self.latencies, 95), 3)
            out["p50_ttft_s"] = round(percentile(self.ttfts, 50), 3)
            out["p95_ttft_s"] = round(percentile(self.ttfts, 95), 3)
        return out


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


# -- files ----------------------------------------------------------------------------------
def prepare(work: Path, model: str, tiny: bool, count: int) -> tuple[Path, Path, Path]:
    """(model dir, adapter dir holding `count` LoRA adapters a0..., merged model of a0)."""
    model_dir = work / "model" if tiny else resolve_model_path(model)
    if tiny:
        tiny_model(model_dir)
    base, tokenizer = load_model(str(model_dir))
    adapted = tilpass.AdaptedModel(base)
    config = tilpass.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    torch.manual_seed(0)
    names = [f"a{i}" for i in range(count)]
    for name in names:
        adapted.add_adapter(name, config)
        with torch.no_grad():
            for p in adapted.adapter_parameters(name):
                p.normal_(0, 0.02)  # B non-zero: every adapter changes the output
    adapter_dir = work / "adapters"
    adapted.save_pretrained(adapter_dir, selected_adapters=names)
    merged_dir = work / "merged"
    merged = adapted.merge_and_unload(adapter_names=["a0"])
    merged.save_pretrained(merged_dir)
    tokenizer.save_pretrained(merged_dir)
    return model_dir, adapter_dir, merged_dir


def tiny_model(model_dir: Path) -> None:
    """A small random Llama with the default model's tokenizer (for a quick check)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(DEFAULT_MODEL))
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)


# -- servers --------------------------------------------------------------------------------
@dataclass
class Process:
    """A server subprocess and its base URL."""

    proc: subprocess.Popen[str]
    url: str

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def start_tilpass(model_dir: Path, adapter_dir: Path, count: int, clients: int) -> Process:
    pairs = [x for i in range(count) for x in ("--adapter", f"a{i}={adapter_dir / f'a{i}'}")]
    command = [
        sys.executable, "-m", "tilpass.cli", "serve", "--model", str(model_dir), "--port", "0",
        "--max-batch", str(clients), "--max-queue", str(4 * clients), *pairs,
    ]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        match = re.search(r"tilpass serve: (http://\S+)/v1", line)
        if match:
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep it drained
            return Process(proc, match.group(1))
    raise RuntimeError("tilpass serve did not start")


def start_peer(merged_dir: Path, port: int) -> Process:
    """`transformers serve --continuous-batching` with the merged model."""
    command = [
        "transformers", "serve", str(merged_dir), "--continuous-batching",
        "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    executable = Path(sys.executable).parent / "transformers"
    command[0] = str(executable) if executable.exists() else command[0]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"transformers serve exited with code {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return Process(proc, url)
        except httpx.HTTPError:
            time.sleep(1)
    proc.kill()
    raise RuntimeError("transformers serve did not answer /health within 300 s")


# -- clients --------------------------------------------------------------------------------
async def one_request(http: httpx.AsyncClient, body: dict[str, Any], result: Result) -> None:
    """One streamed completion: latency, time to first token, tokens streamed."""
    start = time.perf_counter()
    first = None
    tokens = 0
    async with http.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                first = first or time.perf_counter()
                tokens += 0 if chunk.get("usage") else 1
    end = time.perf_counter()
    result.tokens += tokens
    result.latencies.append(end - start)
    result.ttfts.append((first or end) - start)


async def drive(
    url: str, models: list[str], load: Load, name: str, adapters: int, peer: bool = False
) -> Result:
    """`load.clients` clients, each sending its share of the requests one after another."""
    prompts = load.prompts()
    result = Result(name, adapters, 0, 0.0)
    limits = httpx.Limits(max_connections=load.clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:

        async def client(c: int) -> None:
            for i in range(c, len(prompts), load.clients):
                body = request_body(models[i % len(models)], prompts[i], load.max_tokens, peer)
                await one_request(http, body, result)

        start = time.perf_counter()
        await asyncio.gather(*(client(c) for c in range(load.clients)))
        result.seconds = time.perf_counter() - start
    return result


def request_body(model: str, prompt: str, max_tokens: int, peer: bool) -> dict[str, Any]:
    """A streamed greedy completion of exactly `max_tokens` tokens. tilpass takes vLLM's
    `ignore_eos`; transformers serve refuses unknown fields but takes a `generation_config`
    (without an eos token it never stops early)."""
    body: dict[str, Any] = {
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
        "stream": True,
    }  # fmt: skip
    if peer:
        config = {"max_new_tokens": max_tokens, "do_sample": False}
        body["generation_config"] = json.dumps(config)
    else:
        body.update(stream_options={"include_usage": True}, ignore_eos=True)
    return body


# -- in-process baselines -------------------------------------------------------------------
def in_process(
    model_dir: Path, adapter_dir: Path, count: int, load: Load, mixes: list[int]
) -> list[Result]:
    """Batched `generate` (mixed rows) and the naive per-adapter batches, per mix."""
    base, tokenizer = load_model(str(model_dir))
    tokenizer.padding_side = "left"
    model = tilpass.AdaptedModel(base)
    for i in range(count):
        model.load_adapter(adapter_dir / f"a{i}", f"a{i}")
    model.eval()
    prompts = load.prompts()
    results = []
    for k in mixes:
        names = [f"a{i % k}" for i in range(len(prompts))]
        batches = [list(range(s, min(s + load.clients, len(prompts))))
                   for s in range(0, len(prompts), load.clients)]  # fmt: skip
        results.append(
            timed_generate(model, tokenizer, prompts, names, batches, load, "generate", k)
        )
        groups = [[i for i in range(len(prompts)) if names[i] == f"a{a}"] for a in range(k)]
        results.append(timed_generate(model, tokenizer, prompts, names, groups, load, "naive", k))
    return results


def timed_generate(
    model: Any, tokenizer: Any, prompts: list[str], names: list[str],
    batches: list[list[int]], load: Load, system: str, k: int,
) -> Result:  # fmt: skip
    """Run `batches` (lists of request indices) through `generate`, one after another."""
    tokens = 0
    start = time.perf_counter()
    for rows in batches:
        encoded = tokenizer([prompts[i] for i in rows], return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(
                **encoded, adapter_names=[names[i] for i in rows], do_sample=False,
                max_new_tokens=load.max_tokens, min_new_tokens=load.max_tokens,
                pad_token_id=tokenizer.pad_token_id,
            )  # fmt: skip
        tokens += (out.shape[1] - encoded["input_ids"].shape[1]) * len(rows)
    return Result(system, k, tokens, time.perf_counter() - start)


# -- the run --------------------------------------------------------------------------------
def main() -> None:
    args = parse_args()
    load = Load(args.clients, args.requests_per_client, args.prompt_words, args.max_tokens)
    mixes = [int(m) for m in args.mixes.split(",")]
    count = max(mixes)
    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    model_dir, adapter_dir, merged_dir = prepare(work, args.model, args.tiny, count)
    results: list[Result] = []
    server = start_tilpass(model_dir, adapter_dir, count, load.clients)
    try:
        asyncio.run(drive(server.url, ["a0"], Load(load.clients, 1, 8, 4), "warm-up", 1))
        for k in mixes:
            models = [f"a{i}" for i in range(k)]
            results.append(asyncio.run(drive(server.url, models, load, "tilpass serve", k)))
    finally:
        server.stop()
    results += in_process(model_dir, adapter_dir, count, load, mixes)
    peer_note = ""
    if args.peer:
        try:
            results.append(measure_peer(merged_dir, args.peer_port, load))
        except (RuntimeError, OSError, httpx.HTTPError) as exc:
            peer_note = f"transformers serve could not be measured: {exc}"
    report(results, load, args, peer_note)


def measure_peer(merged_dir: Path, port: int, load: Load) -> Result:
    """The same clients against `transformers serve --continuous-batching` (merged a0)."""
    peer = start_peer(merged_dir, port)
    try:
        name = str(merged_dir)
        warm = Load(load.clients, 1, 8, 4)
        asyncio.run(drive(peer.url, [name], warm, "warm-up", 1, peer=True))
        system = "transformers serve --continuous-batching (1 merged adapter)"
        return asyncio.run(drive(peer.url, [name], load, system, 1, peer=True))
    finally:
        peer.stop()


def report(results: list[Result], load: Load, args: argparse.Namespace, note: str) -> None:
    """Print the table and the gates; write JSON if asked."""
    rows = [r.row() for r in results]
    by = {(r.system, r.adapters): r.tokens_per_s for r in results}
    gates = {}
    top = max(int(m) for m in args.mixes.split(","))
    if ("tilpass serve", top) in by:
        gates[f"serve / in-process generate ({top} adapters)"] = (
            by[("tilpass serve", top)] / by[("generate", top)]
        )
        gates[f"serve {top} adapters / serve 1 adapter"] = (
            by[("tilpass serve", top)] / by[("tilpass serve", 1)]
        )
        gates[f"serve {top} adapters / naive per-adapter batches"] = (
            by[("tilpass serve", top)] / by[("naive", top)]
        )
        peers = [v for (s, _), v in by.items() if s.startswith("transformers serve")]
        if peers:
            gates[f"serve {top} adapters / transformers serve (merged)"] = (
                by[("tilpass serve", top)] / peers[0]
            )
    env = {
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_avg": os.getloadavg(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }
    for row in rows:
        print(json.dumps(row))
    for name, value in gates.items():
        print(f"{name}: {value:.2f}x")
    if note:
        print(note)
    print(json.dumps(env))
    if args.json:
        payload = {"load": asdict(load), "results": rows, "gates": gates, "note": note, "env": env}
        Path(args.json).write_text(json.dumps(payload, indent=2))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="base model name or directory")
    p.add_argument("--tiny", action="store_true", help="a small random Llama instead")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--prompt-words", type=int, default=24)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--mixes", default="1,4,16", help="distinct adapters in the request mix")
    p.add_argument("--peer", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure transformers serve --continuous-batching")  # fmt: skip
    p.add_argument("--peer-port", type=int, default=8765)
    p.add_argument("--json", default=None, help="write the results here")
    return p.parse_args()


if __name__ == "__main__":
    main()
