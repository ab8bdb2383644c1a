"""`tilpass serve` as a real HTTP server in a subprocess, driven by the official `openai`
client and by raw HTTP: models, completions, chat, streaming, every method's adapters mixed in
one batch (each answer equal to that adapter's own `generate`), on-demand loading with LRU
eviction, load / unload, bad input, API key, disconnects, overload, metrics and SIGTERM."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from serve_helpers import ADAPTERS, ServerProcess, build_files

import tilpass

KEY = "test-key"
BASE = "model"  # the served model's id: its directory's name
PROMPTS = ([5, 6, 7, 8, 9], [40, 41], [100, 7, 250, 33, 12, 9, 61])


@dataclass
class Served:
    server: ServerProcess
    model: tilpass.AdaptedModel
    tokenizer: Any
    adapter_dir: Path

    def client(self, key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.server.url}/v1", api_key=key, max_retries=0)

    def http(self, key: str | None = KEY) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.server.url, headers=headers, timeout=30)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, _tiny_tokenizer_json: str) -> Any:
    from conftest import CHATML_TEMPLATE
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json),
        eos_token="<|im_end|>",
        pad_token="<pad>",
        chat_template=CHATML_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
    root = tmp_path_factory.mktemp("serve")
    model_dir, adapter_dir, model = build_files(root, tokenizer)
    unsafe_adapters(root, adapter_dir)
    server = ServerProcess(
        [
            "--model", str(model_dir),
            "--adapter", f"lora_a={adapter_dir / 'lora_a'}",
            "--adapter-dir", str(adapter_dir),
            "--max-adapters", "3",
            "--max-batch", "4",
            "--max-queue", "12",
            "--max-prompt-tokens", "32",
            "--max-tokens", "400",
            "--max-body-bytes", "4096",
            "--api-key", KEY,
            "--allow-adapter-loading",
            "--shutdown-timeout", "10",
        ]
    )  # fmt: skip
    server.start()
    yield Served(server, model, tokenizer, adapter_dir)
    server.stop()


def unsafe_adapters(root: Path, adapter_dir: Path) -> None:
    """Adapter directories the server must refuse: a symlink out of the adapter directory,
    a weights file linked from outside, and a pickle-only adapter."""
    outside = root / "outside"
    shutil.copytree(adapter_dir / "lora_b", outside)
    (adapter_dir / "escape").symlink_to(outside, target_is_directory=True)
    linked = adapter_dir / "linked"
    linked.mkdir()
    shutil.copy(outside / "adapter_config.json", linked)
    (linked / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    pickled = adapter_dir / "pickled"
    pickled.mkdir()
    shutil.copy(outside / "adapter_config.json", pickled)
    (pickled / "adapter_model.bin").write_bytes(b"not loaded")


def reference(model: tilpass.AdaptedModel, adapter: str, prompt: list[int], n: int) -> list[int]:
    """What `generate` gives for that adapter alone (greedy)."""
    ids = torch.tensor([prompt])
    name = "__base__" if adapter == BASE else adapter
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), adapter_names=[name],
            max_new_tokens=n, do_sample=False,
        )  # fmt: skip
    return out[0, len(prompt) :].tolist()


def complete(served: Served, adapter: str, prompt: list[int], n: int) -> Any:
    return served.client().completions.create(
        model=adapter, prompt=prompt, max_tokens=n, temperature=0,
        extra_body={"return_token_ids": True},
    )  # fmt: skip


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    """The OpenAI-shaped error body of a response with `status`."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"], error
    return error


def test_models_lists_base_and_adapters(served: Served) -> None:
    assert "model=model" in served.server.startup and "max_queue=12" in served.server.startup
    models = {m.id: m for m in served.client().models.list()}
    assert models[BASE].parent is None
    assert models["lora_a"].parent == BASE and models["lora_a"].root == "lora_a"


def test_concurrent_mixed_adapters_equal_generate(served: Served) -> None:
    """Two LoRA adapters and the base, plus DoRA, (IA)3, bottleneck and prompt tuning, all at
    once through a batch of 4 with 3 on-demand cache slots: each answer is its own adapter's
    `generate`, token for token."""
    # Start from the pinned adapter only, whatever ran before on this server (under xdist
    # other tests may have run first), so every adapter here is loaded on demand, in the
    # order the threads ask (the (IA)3 adapter inside the MLP a bottleneck wraps, or before).
    with served.http() as http:
        for model in served.client().models.list():
            if model.id not in (BASE, "lora_a"):
                http.post("/v1/unload_lora_adapter", json={"lora_name": model.id})
    jobs = [(a, p) for a in ("lora_a", "lora_b", BASE) for p in PROMPTS[:2]]
    jobs += [(a, PROMPTS[2]) for a in ADAPTERS if a not in ("lora_a", "lora_b")]
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda job: complete(served, job[0], job[1], 10), jobs))
    base_answers = {tuple(p): reference(served.model, BASE, p, 10) for p in PROMPTS}
    for (adapter, prompt), answer in zip(jobs, answers, strict=True):
        expected = reference(served.model, adapter, prompt, 10)
        choice = answer.choices[0]
        assert choice.token_ids == expected, adapter
        assert choice.text == served.tokenizer.decode(expected, skip_special_tokens=True)
        assert answer.usage.prompt_tokens == len(prompt)
        assert answer.usage.completion_tokens == len(expected)
        if adapter != BASE:  # not vacuous: every adapter changes the output
            assert expected != base_answers[tuple(prompt)], adapter


def test_on_demand_adapters_are_evicted_least_recently_used(served: Served) -> None:
    for adapter in ("lora_b", "dora", "ia3", "bottleneck"):
        complete(served, adapter, PROMPTS[1], 2)
    loaded = {m.id for m in served.client().models.list()}
    assert loaded == {BASE, "lora_a", "dora", "ia3", "bottleneck"}  # lora_a is pinned
    answer = complete(served, "lora_b", PROMPTS[0], 6)  # reloaded after its eviction
    assert answer.choices[0].token_ids == reference(served.model, "lora_b", PROMPTS[0], 6)


def test_chat_uses_the_chat_template(served: Served) -> None:
    messages = [{"role": "user", "content": "What is two plus two?"}]
    answer = served.client().chat.completions.create(
        model="lora_b", messages=messages, max_tokens=8, temperature=0
    )
    text = served.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    assert text.endswith("<|im_start|>assistant\n")
    prompt = served.tokenizer(text, add_special_tokens=False)["input_ids"]
    expected = reference(served.model, "lora_b", prompt, 8)
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == served.tokenizer.decode(
        expected, skip_special_tokens=True
    )
    assert answer.usage.prompt_tokens == len(prompt)


def test_streaming_matches_the_whole_answer(served: Served) -> None:
    client = served.client()
    whole = complete(served, "lora_a", PROMPTS[2], 12).choices[0]
    chunks = list(
        client.completions.create(
            model="lora_a", prompt=PROMPTS[2], max_tokens=12, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.finish_reason
    assert chunks[-1].usage.completion_tokens == len(whole.token_ids)
    messages = [{"role": "user", "content": "hello"}]
    chat = client.chat.completions.create(
        model=BASE, messages=messages, max_tokens=6, temperature=0, stream=True
    )
    deltas = [c.choices[0].delta for c in chat]
    assert deltas[0].role == "assistant"
    with served.http().stream("POST", "/v1/completions", json={
        "model": "lora_a", "prompt": PROMPTS[0], "max_tokens": 4, "stream": True
    }) as response:  # fmt: skip
        lines = [line for line in response.iter_lines() if line]
    assert response.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_seeded_sampling_repeats_and_stop_strings_cut(served: Served) -> None:
    client = served.client()
    kwargs = {"model": "lora_a", "prompt": PROMPTS[0], "max_tokens": 12, "temperature": 1.0}
    first = client.completions.create(**kwargs, top_p=0.9, seed=7).choices[0].text
    assert client.completions.create(**kwargs, top_p=0.9, seed=7).choices[0].text == first
    text = served.tokenizer.decode(reference(served.model, BASE, PROMPTS[1], 20), True)
    assert "$H" in text, text  # the tiny model's greedy text: "ize$H$H..."
    answer = client.completions.create(
        model=BASE, prompt=PROMPTS[1], max_tokens=20, temperature=0, stop=["$H", "never"]
    )
    assert answer.choices[0].text == text[: text.index("$H")]
    assert answer.choices[0].finish_reason == "stop"


BAD_REQUESTS = [
    # (body, status, what the message names)
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    ({"model": "lora_a", "prompt": [5, 6], "max_tokens": "5"}, 400, "max_tokens"),
    ({"model": "lora_a"}, 400, "prompt"),
    ({"model": "nope", "prompt": [5]}, 404, "nope"),
    ({"model": "../model", "prompt": [5]}, 400, "invalid adapter name"),
    ({"model": "/etc", "prompt": [5]}, 400, "invalid adapter name"),
    ({"model": "escape", "prompt": [5]}, 400, "outside the adapter directory"),
    ({"model": "linked", "prompt": [5]}, 400, "links outside"),
    ({"model": "pickled", "prompt": [5]}, 400, "safetensors only"),
    ({"model": "lora_a", "prompt": [5], "n": 2}, 400, "n"),
    ({"model": "lora_a", "prompt": [5], "temperature": -1}, 400, "temperature"),
    ({"model": "lora_a", "prompt": [5] * 33}, 400, "over the limit of 32"),
    ({"model": "lora_a", "prompt": [5], "max_tokens": 401}, 400, "max_tokens=401"),
    ({"model": "lora_a", "prompt": [99999]}, 400, "token ids"),
    ({"model": "lora_a", "prompt": "x" * 5000}, 413, "4096 bytes"),
]


def test_bad_input_gets_a_4xx_and_the_server_stays_healthy(served: Served) -> None:
    with served.http() as http:
        for body, status, needle in BAD_REQUESTS:
            if isinstance(body, bytes):
                response = http.post("/v1/completions", content=body)
            else:
                response = http.post("/v1/completions", json=body)
            assert needle in error_of(response, status)["message"], (body, response.text)
        messages = {"model": "lora_a", "messages": [{"role": "robot", "content": "x"}]}
        assert "role" in error_of(http.post("/v1/chat/completions", json=messages), 400)["param"]
        error_of(http.get("/v1/nothing"), 404)
        assert http.get("/health").json() == {"status": "ok"}
    assert complete(served, "lora_a", PROMPTS[0], 3).choices[0].finish_reason == "length"


def test_api_key_is_checked_on_every_route_but_health(served: Served) -> None:
    for key in (None, "wrong"):
        with served.http(key) as http:
            assert http.get("/health").status_code == 200
            for path in ("/v1/models", "/metrics"):
                assert error_of(http.get(path), 401)["code"] == "invalid_api_key"
            error_of(http.post("/v1/completions", json={"model": BASE, "prompt": [5]}), 401)
    with pytest.raises(openai.AuthenticationError):
        served.client("wrong").models.list()


def test_load_and_unload_adapters(served: Served) -> None:
    with served.http() as http:
        loaded = http.post(
            "/v1/load_lora_adapter", json={"lora_name": "extra", "lora_path": "lora_b"}
        )
        assert loaded.status_code == 200, loaded.text
        assert "extra" in {m.id for m in served.client().models.list()}
        answer = complete(served, "extra", PROMPTS[1], 6)
        assert answer.choices[0].token_ids == reference(served.model, "lora_b", PROMPTS[1], 6)
        absolute = str(served.adapter_dir.resolve() / "lora_b")
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": "extra"}).status_code == 200
        error_of(http.post("/v1/completions", json={"model": "extra", "prompt": [5]}), 404)
        again = http.post(
            "/v1/load_lora_adapter", json={"lora_name": "extra", "lora_path": absolute}
        )
        assert (
            again.status_code == 200
            and http.post("/v1/unload_lora_adapter", json={"lora_name": "extra"}).status_code == 200
        )
        for body, status in (
            ({"lora_name": "x", "lora_path": "/etc"}, 400),
            ({"lora_name": "x", "lora_path": "../model"}, 400),
            ({"lora_name": "x", "lora_path": "escape"}, 400),
            ({"lora_name": "lora_a", "lora_path": "lora_b"}, 400),
            ({"lora_name": "x"}, 400),
        ):
            error_of(http.post("/v1/load_lora_adapter", json=body), status)
        error_of(http.post("/v1/unload_lora_adapter", json={"lora_name": "nope"}), 404)


def metric(served: Served, name: str, labels: dict[str, str] | None = None) -> float:
    with served.http() as http:
        text = http.get("/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and (labels or {}).items() <= sample.labels.items():
                return float(sample.value)
    return 0.0


def test_client_that_disconnects_mid_stream_frees_its_slot(served: Served) -> None:
    before = metric(served, "tilpass_sequences_finished_total", {"reason": "cancelled"})
    body = {"model": "lora_a", "prompt": PROMPTS[0], "max_tokens": 400, "stream": True}
    with served.http() as http, http.stream("POST", "/v1/completions", json=body) as response:
        next(response.iter_lines())  # the stream has started; then the client goes away
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        cancelled = metric(served, "tilpass_sequences_finished_total", {"reason": "cancelled"})
        if cancelled > before and metric(served, "tilpass_running_batch_size") == 0:
            break
        time.sleep(0.1)
    assert cancelled == before + 1
    assert complete(served, "lora_a", PROMPTS[1], 2).choices[0].finish_reason == "length"


def test_client_that_disconnects_before_its_whole_answer_frees_its_slot(served: Served) -> None:
    """A non-streaming client that gives up while tokens are still being generated: its
    request is cancelled within a poll interval, not when its answer would be complete."""
    before = metric(served, "tilpass_sequences_finished_total", {"reason": "cancelled"})
    body = {"model": "lora_a", "prompt": PROMPTS[0], "max_tokens": 400, "ignore_eos": True}
    with served.http() as http, pytest.raises(httpx.ReadTimeout):
        http.post("/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.3))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        cancelled = metric(served, "tilpass_sequences_finished_total", {"reason": "cancelled"})
        if cancelled > before and metric(served, "tilpass_running_batch_size") == 0:
            break
        time.sleep(0.05)
    assert cancelled == before + 1
    generated = metric(served, "tilpass_generation_tokens_total")
    assert complete(served, "lora_a", PROMPTS[1], 2).choices[0].finish_reason == "length"
    assert metric(served, "tilpass_generation_tokens_total") == generated + 2


def test_overload_answers_429_at_once(served: Served) -> None:
    async def flood() -> list[httpx.Response]:
        headers = {"Authorization": f"Bearer {KEY}"}
        async with httpx.AsyncClient(base_url=served.server.url, headers=headers) as http:
            body = {"model": "lora_a", "prompt": PROMPTS[0], "max_tokens": 30, "temperature": 0}
            calls = [http.post("/v1/completions", json=body, timeout=60) for _ in range(32)]
            return await asyncio.gather(*calls)

    responses = asyncio.run(flood())
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429} and 200 in statuses and 429 in statuses, statuses
    refused = next(r for r in responses if r.status_code == 429)
    assert error_of(refused, 429)["type"] == "rate_limit_error"
    with served.http() as http:
        assert http.get("/health").status_code == 200


def test_metrics_are_prometheus_text(served: Served) -> None:
    complete(served, "lora_a", PROMPTS[1], 2)
    with served.http() as http:
        response = http.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    for name in (
        "tilpass_requests", "tilpass_prompt_tokens", "tilpass_generation_tokens",
        "tilpass_queue_length", "tilpass_running_batch_size", "tilpass_adapters_loaded",
        "tilpass_request_latency_seconds", "tilpass_time_to_first_token_seconds",
    ):  # fmt: skip
        assert name in families, name
    assert metric(served, "tilpass_generation_tokens_total") > 0
    assert metric(served, "tilpass_time_to_first_token_seconds_count") > 0
    route = {"route": "/v1/completions", "status": "200"}
    assert metric(served, "tilpass_requests_total", route) > 0
    assert metric(served, "tilpass_adapters_loaded") >= 1


def test_sigterm_finishes_in_flight_requests_and_exits_cleanly(served: Served) -> None:
    """Last in this file: it stops the module's server."""
    body = {"model": "lora_b", "prompt": PROMPTS[0], "max_tokens": 30, "stream": True}
    lines: list[str] = []
    with served.http() as http, http.stream("POST", "/v1/completions", json=body) as response:
        stream = response.iter_lines()
        lines.append(next(stream))
        stopper = threading.Thread(target=lambda: lines.append(f"rc={served.server.terminate()}"))
        stopper.start()
        lines += [line for line in stream if line]
    stopper.join()
    assert "data: [DONE]" in lines, lines[-3:]
    finished = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert finished[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    assert lines[-1] == "rc=0" and "tilpass serve: stopped" in served.server.output()
