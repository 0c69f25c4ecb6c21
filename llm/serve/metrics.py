"""Per-request observability: time to first token, tokens/s and queue time as Serve metrics and a log line.

Serve exports `ray.serve.metrics` through Ray's Prometheus endpoint with the deployment and replica as
tags; the log line lands in the replica's log (`serve` logs, `ray logs`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

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
