"""`tilpass serve` shutting down with work left: on SIGTERM a request still waiting for a row
is answered 503 at once, and a running one that outlives `--shutdown-timeout` ends with a
503 error in its stream; the process still exits 0, soon after the timeout."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from serve_helpers import ServerProcess, build_files

PROMPT = [5, 6, 7, 8, 9]
TIMEOUT_S = 0  # the running request cannot finish in time, whatever the machine


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, _tiny_tokenizer_json: str) -> Any:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json),
        eos_token="<|im_end|>",
        pad_token="<pad>",
    )
    root: Path = tmp_path_factory.mktemp("serve-shutdown")
    model_dir, adapter_dir, _ = build_files(root, tokenizer)
    process = ServerProcess(
        [
            "--model", str(model_dir), "--adapter", f"lora_a={adapter_dir / 'lora_a'}",
            "--max-batch", "1", "--max-tokens", "500",
            "--shutdown-timeout", str(TIMEOUT_S),
        ]
    )  # fmt: skip
    process.start()
    yield process
    process.stop()


def queue_length(url: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("tilpass_queue_length "):
            return float(line.split()[1])
    return 0.0


def test_sigterm_answers_503_and_exits_after_the_timeout(server: ServerProcess) -> None:
    """Run a long streamed request, queue a second one behind it (one row), then SIGTERM."""
    streamed: list[str] = []
    started = threading.Event()
    waiting: list[httpx.Response] = []

    def stream() -> None:
        body = {"model": "lora_a", "prompt": PROMPT, "max_tokens": 500, "ignore_eos": True,
                "stream": True}  # fmt: skip
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                started.set()
                if line:
                    streamed.append(line)

    def queued() -> None:
        body = {"model": "lora_a", "prompt": PROMPT, "max_tokens": 5}
        waiting.append(httpx.post(f"{server.url}/v1/completions", json=body, timeout=60))

    threads = [threading.Thread(target=stream), threading.Thread(target=queued)]
    threads[0].start()
    assert started.wait(30)
    threads[1].start()
    deadline = time.monotonic() + 10
    while queue_length(server.url) < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert queue_length(server.url) == 1, "the second request never queued"
    begin = time.monotonic()
    assert server.terminate() == 0
    elapsed = time.monotonic() - begin
    for thread in threads:
        thread.join(10)
    assert waiting[0].status_code == 503, waiting[0].text
    assert "shutting down" in waiting[0].json()["error"]["message"]
    errors = [json.loads(x[6:]) for x in streamed if x.startswith("data: {") and "error" in x]
    assert errors and "shut down" in errors[-1]["error"]["message"], streamed[-2:]
    assert "data: [DONE]" not in streamed  # cut short, and said so
    assert elapsed < TIMEOUT_S + 20, elapsed  # soon after the timeout, even on a busy machine
    assert "tilpass serve: stopped" in server.output()
