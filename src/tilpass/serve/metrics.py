"""Prometheus metrics of one server, through `prometheus_client` (a registry of its own, so
two servers in one process never share counters)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from tilpass.serve.engine import Observer, Sequence

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServeMetrics(Observer):
    """Requests, tokens, queue length, running batch size, adapters loaded, latency and
    time to first token."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        self.requests = Counter(
            "tilpass_requests", "HTTP requests answered", ["route", "status"], registry=reg
        )
        self.prompt_tokens = Counter(
            "tilpass_prompt_tokens", "Prompt tokens of accepted requests", registry=reg
        )
        self.generation_tokens = Counter(
            "tilpass_generation_tokens", "Tokens generated", registry=reg
        )
        self.finished = Counter(
            "tilpass_sequences_finished", "Sequences that left the batch", ["reason"], registry=reg
        )
        self.queue = Gauge("tilpass_queue_length", "Requests waiting to start", registry=reg)
        self.running = Gauge("tilpass_running_batch_size", "Sequences in the batch", registry=reg)
        self.adapters = Gauge("tilpass_adapters_loaded", "Adapters in memory", registry=reg)
        self.latency = Histogram(
            "tilpass_request_latency_seconds",
            "Time from a request's arrival to its last token",
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.ttft = Histogram(
            "tilpass_time_to_first_token_seconds",
            "Time from a request's arrival to its first token",
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )

    def on_step(self, waiting: int, running: int, adapters: int) -> None:
        self.queue.set(waiting)
        self.running.set(running)
        self.adapters.set(adapters)

    def on_first_token(self, seq: Sequence) -> None:
        assert seq.first_token_at is not None
        self.ttft.observe(seq.first_token_at - seq.request.created)

    def on_finish(self, seq: Sequence, reason: str) -> None:
        self.latency.observe(time.monotonic() - seq.request.created)
        self.generation_tokens.inc(seq.generated)
        self.finished.labels(reason).inc()

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
