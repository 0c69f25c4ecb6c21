"""Per-request observability: time to first token, tokens/s and queue time as Serve metrics and a log line.

Serve exports `ray.serve.metrics` through Ray's Prometheus endpoint with the deployment and replica as
tags; the log line lands in the replica's log (`serve` logs, `ray logs`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from llm.serve.engine import RequestStats

log = logging.getLogger("ray.serve")

_SECONDS = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
_RATES = [1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0]


def request_recorder(model: str) -> Callable[[RequestStats], None]:
    """A callback for `Engine(on_finish=...)` that records one finished request."""
    from ray.serve import metrics

    tags = ("model",)
    ttft = metrics.Histogram("llm_time_to_first_token_s", "Time to first token", _SECONDS, tags)
    queue = metrics.Histogram("llm_queue_time_s", "Time waiting to join the running batch", _SECONDS, tags)
    rate = metrics.Histogram("llm_tokens_per_s", "Decode tokens/s of one request", _RATES, tags)
    tokens = metrics.Counter("llm_generated_tokens", "Tokens generated", tags)

    def record(stats: RequestStats) -> None:
        labels = {"model": model}
        ttft.observe(stats.ttft_s, labels)
        queue.observe(stats.queue_s, labels)
        if stats.tokens_per_s:
            rate.observe(stats.tokens_per_s, labels)
        tokens.inc(stats.tokens, labels)
        log.info("%s: prompt %d tokens, generated %d, queue %.1f ms, ttft %.1f ms, %.1f tokens/s", model,
                 stats.prompt_tokens, stats.tokens, stats.queue_s * 1e3, stats.ttft_s * 1e3, stats.tokens_per_s)

    return record


class ReplicaMetrics:
    """Prometheus metrics of one replica, answered at `GET /metrics` in the text format every monitoring
    stack scrapes (names after vLLM's, prefixed `llmray:`). With several replicas, each answers its own."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        m = ("model",)
        self.requests = Counter("llmray:requests", "HTTP requests by route and status", ("route", "status"),
                                registry=r)
        self.prompt_tokens = Counter("llmray:prompt_tokens", "Prompt tokens of finished requests", m, registry=r)
        self.generation_tokens = Counter("llmray:generation_tokens", "Tokens generated", m, registry=r)
        self.ttft = Histogram("llmray:time_to_first_token_seconds", "Time to first token", m, buckets=_SECONDS,
                              registry=r)
        self.tpot = Histogram("llmray:time_per_output_token_seconds", "Time per output token after the first", m,
                              buckets=_SECONDS, registry=r)
        self.queue = Histogram("llmray:request_queue_time_seconds", "Time waiting to join the running batch", m,
                               buckets=_SECONDS, registry=r)
        self.e2e = Histogram("llmray:e2e_request_latency_seconds", "Submit to last token", m, buckets=_SECONDS,
                             registry=r)
        self.running = Gauge("llmray:num_requests_running", "Sequences in the running batch", m, registry=r)
        self.waiting = Gauge("llmray:num_requests_waiting", "Sequences waiting to join the batch", m, registry=r)
        self.occupancy = Gauge("llmray:batch_occupancy", "Running sequences / max_batch_size", m, registry=r)

    def watch(self, model: str, engine: Any) -> None:
        """Gauges read from the engine at scrape time."""
        self.running.labels(model).set_function(lambda: engine.running)
        self.waiting.labels(model).set_function(lambda: engine.waiting)
        self.occupancy.labels(model).set_function(lambda: engine.running / engine.max_batch_size)

    def recorder(self, model: str) -> Callable[[RequestStats], None]:
        """A callback recording one finished request of `model`."""

        def record(stats: RequestStats) -> None:
            self.prompt_tokens.labels(model).inc(stats.prompt_tokens)
            self.generation_tokens.labels(model).inc(stats.tokens)
            self.ttft.labels(model).observe(stats.ttft_s)
            self.queue.labels(model).observe(stats.queue_s)
            if stats.tokens_per_s:
                self.tpot.labels(model).observe(1.0 / stats.tokens_per_s)
            self.e2e.labels(model).observe((stats.finished or stats.submitted) - stats.submitted)

        return record

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
