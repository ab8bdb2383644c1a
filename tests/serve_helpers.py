"""A real `tilpass serve` subprocess on a free loopback port, and the tiny model and adapter
files it serves (built from configs, saved as safetensors; nothing is downloaded)."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch
from helpers import lora, tiny_llama

import tilpass

VOCAB = 400  # the tiny tokenizer's
CONTEXT = 512
ADAPTERS = ("lora_a", "lora_b", "dora", "ia3", "bottleneck", "prompt")


def adapter_configs() -> dict[str, Any]:
    """One config per method (random, non-zero initialisation: no test passes vacuously)."""
    from tilpass.methods.bottleneck import BottleneckConfig
    from tilpass.methods.ia3 import IA3Config

    return {
        "lora_a": lora(),
        "lora_b": lora(r=8, target_modules=["q_proj", "v_proj", "o_proj"]),
        "dora": lora(use_dora=True, target_modules=["q_proj", "o_proj"]),
        # One module takes adapters of one method: (IA)3 and the bottleneck get their own.
        "ia3": IA3Config(
            target_modules=["k_proj", "up_proj"],
            feedforward_modules=["up_proj"],
            init_ia3_weights=False,
        ),
        "bottleneck": BottleneckConfig(
            bottleneck_size=4, placement="pfeiffer", scaling=0.5, init_weights=False
        ),
        "prompt": tilpass.PromptTuningConfig(num_virtual_tokens=3),
    }


def build_files(root: Path, tokenizer: Any) -> tuple[Path, Path, tilpass.AdaptedModel]:
    """Save the tiny model (with tokenizer) and one adapter per method under `root`;
    return (model dir, adapter dir, the same model with every adapter, for references)."""
    model_dir, adapter_dir = root / "model", root / "adapters"
    base = tiny_llama(vocab_size=VOCAB)
    base.config.max_position_embeddings = CONTEXT  # room for long streams (RoPE has no cap)
    base.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    model = with_adapters(base)
    model.save_pretrained(adapter_dir, selected_adapters=list(ADAPTERS))
    return model_dir, adapter_dir, model


def with_adapters(base: Any) -> tilpass.AdaptedModel:
    """`base` with one adapter per method (`ADAPTERS`), in eval mode."""
    torch.manual_seed(1)
    model = tilpass.AdaptedModel(base)
    for name, config in adapter_configs().items():
        model.add_adapter(name, config)
        with torch.no_grad():  # large enough that every adapter changes the greedy output
            for p in model.adapter_parameters(name):
                p.add_(0.5 * torch.randn_like(p))
    return model.eval()


@dataclass
class ServerProcess:
    """`python -m tilpass.cli serve ARGS` on port 0; `url` is read from its start-up line."""

    args: list[str]
    proc: subprocess.Popen[str] | None = None
    url: str = ""
    startup: str = ""
    lines: list[str] = field(default_factory=list)

    def start(self, timeout: float = 120.0) -> ServerProcess:
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        command = [sys.executable, "-m", "tilpass.cli", "serve", "--port", "0", *self.args]
        self.proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        seen: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self.drain, args=(seen,), daemon=True).start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = seen.get(timeout=0.5)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            match = re.search(r"tilpass serve: (http://\S+)/v1", line)
            if match:
                self.url, self.startup = match.group(1), line
                return self.healthy(deadline)
        self.stop()
        raise RuntimeError("the server did not start:\n" + "".join(self.lines))

    def healthy(self, deadline: float) -> ServerProcess:
        """Wait until `/health` answers (the engine has started)."""
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("the server never answered /health:\n" + "".join(self.lines))

    def drain(self, seen: queue.Queue[str]) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            seen.put(line)

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM, then wait for the exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def output(self) -> str:
        return "".join(self.lines)
