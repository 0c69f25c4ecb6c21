"""Serving benchmark: ratios measured in one run with the real `openai` client (not a pass/fail test).

    python bench/serve.py [CONFIG] [KEY=VALUE ...]     # default: a tiny model built here, cluster/local.yaml

- added latency: p50 of a 1-token completion through the Serve endpoint minus the same call in-process
  (the same FastAPI app and engine in this process, through httpx's ASGI transport), concurrency 1;
- batching: generated tokens/s at 16 concurrent streams / at 1;
- time to first token p50 at concurrency 16 / at 1.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPT = "The for statement is used to iterate over the elements of a sequence"
STREAM_TOKENS = 64


def _p50(xs: list[float]) -> float:
    return statistics.median(xs)


def in_process_p50(model_dir: str, n: int, cfg) -> float:
    """p50 seconds of a 1-token completion through the app in this process (no Serve, no network), with the
    replica's torch threads: the difference is then what Serve and HTTP add, not a thread count."""
    import httpx
    import openai
    import torch

    from llm.models.load import load_model
    from llm.serve.app import replica_threads
    from llm.serve.engine import Engine
    from llm.serve.routes import create_app
    from llm.serve.service import Service

    torch.set_num_threads(replica_threads(cfg))
    app = create_app(Service({"tiny": Engine(load_model(model_dir), cfg.max_batch_size)}, cfg))

    async def main() -> list[float]:
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://local")
        client = openai.AsyncOpenAI(base_url="http://local/v1", api_key="x", http_client=http, max_retries=0)
        times = []
        for i in range(n + 5):
            t0 = time.perf_counter()
            await client.completions.create(model="tiny", prompt=PROMPT, max_tokens=1, temperature=0)
            if i >= 5:  # warm-up
                times.append(time.perf_counter() - t0)
        return times

    return _p50(asyncio.run(main()))


def endpoint_p50(client, n: int) -> float:
    times = []
    for i in range(n + 5):
        t0 = time.perf_counter()
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=1, temperature=0)
        if i >= 5:
            times.append(time.perf_counter() - t0)
    return _p50(times)


def stream_one(client) -> tuple[int, float]:
    """(tokens, seconds to first token) of one streamed completion."""
    t0 = time.perf_counter()
    first, tokens = None, 0
    stream = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=STREAM_TOKENS, temperature=1.0,
                                       stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text and first is None:
            first = time.perf_counter() - t0
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return tokens, first if first is not None else time.perf_counter() - t0


def streams(client, concurrency: int, rounds: int) -> tuple[float, float]:
    """(generated tokens/s, p50 time to first token) at a concurrency."""
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda _: stream_one(client), range(concurrency)))  # warm-up
        t0 = time.perf_counter()
        results = list(pool.map(lambda _: stream_one(client), range(concurrency * rounds)))
        wall = time.perf_counter() - t0
    return sum(t for t, _ in results) / wall, _p50([f for _, f in results])


def main(argv: list[str]) -> int:
    import openai
    from ray import serve

    from llm.loading import load_config
    from llm.serve.stage import run

    overrides = [a for a in argv if "=" in a]
    config = next((a for a in argv if "=" not in a), None)
    if not any(o.startswith("serve.model=") for o in overrides):
        from tests.serve.conftest import build_tiny_model

        overrides.append(f"serve.model={build_tiny_model(Path(tempfile.mkdtemp(prefix='llmray-bench-')))}")
    loaded = load_config(config, [*overrides, "serve.name=tiny", "serve.foreground=false",
                                  "serve.min_replicas=1", "serve.max_replicas=1",
                                  f"storage={tempfile.mkdtemp(prefix='llmray-bench-runs-')}"])
    import ray

    # A private Ray: never measure (or shut down Serve on) a cluster someone else runs on this machine.
    ray.init(address="local", num_cpus=loaded.llm.ray.num_cpus, include_dashboard=False, log_to_driver=False)
    result = run(loaded.llm)
    try:
        client = openai.OpenAI(base_url=result.metrics["url"], api_key="x", max_retries=0, timeout=120)
        model_dir = next(iter(result.metrics["models"].values()))
        through = endpoint_p50(client, 60)
        local = in_process_p50(model_dir, 60, loaded.llm.serve)
        added_ms = (through - local) * 1e3
        print(f"added latency p50 (1-token completion, concurrency 1): endpoint {through * 1e3:.2f} ms - in-process "
              f"{local * 1e3:.2f} ms = {added_ms:.2f} ms (goal <= 5)")
        rate1, ttft1 = streams(client, 1, 6)
        rate16, ttft16 = streams(client, 16, 2)
        print(f"batching: {rate16:.0f} tokens/s at 16 streams / {rate1:.0f} at 1 = {rate16 / rate1:.2f} (goal >= 4)")
        print(f"time to first token p50: {ttft16 * 1e3:.1f} ms at 16 / {ttft1 * 1e3:.1f} ms at 1 = "
              f"{ttft16 / ttft1:.2f} (no goal yet)")
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
