"""Serving benchmark: ratios measured in one run with the real `openai` client (not a pass/fail test).

    python bench/serve.py [CONFIG] [KEY=VALUE ...]     # default: a tiny model built here, cluster/local.yaml

- added latency: p50 of a 1-token completion through the Serve endpoint minus the same call in-process
  (the same FastAPI app and engine in this process, through httpx's ASGI transport), concurrency 1; beside
  it Serve's own floor: the same difference for a trivial FastAPI app on Serve that generates nothing;
  for each `serve.ingress`: Serve's Python proxy, then HAProxy (its own Ray, in a fresh process);
- engine efficiency: the engine's generated tokens/s at 16 concurrent requests (in a fresh process, after
  Ray has stopped) / a bare batched forward decode loop at batch 16 with a KV cache (the model alone: no scheduler,
  no sampling settings): the median of five side-by-side pairs (each pair's two runs back to back, their order
  alternating), as this machine's speed drifts by up to 1.7x between runs a minute apart;
- batching: generated tokens/s at 16 concurrent streams / at 1;
- time to first token p50 at concurrency 16 / at 1;
- peak memory of a replica process prefilling 16 full-context prompts: keeping the last position's logits
  (what the engine does) / keeping every position's (what it did).
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
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1")
        client = openai.AsyncOpenAI(base_url="http://127.0.0.1/v1", api_key="x", http_client=http, max_retries=0)
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


def engine_vs_bare(model_dir: str, batch: int = 16, tokens: int = 64, pairs: int = 5,
                   device: str = "cpu") -> tuple[float, float, float]:
    """(engine tokens/s at `batch` concurrent requests, bare batched decode loop tokens/s, the median of the
    pairs' ratios), in this process; medians over `pairs` back-to-back pairs, their order alternating."""
    import torch
    from transformers import DynamicCache

    from llm.models.load import load_model
    from llm.serve.engine import Engine, GenerateRequest
    from llm.serve.sampling import Sampling

    if device == "cpu":
        torch.set_num_threads(1)  # as a replica with one CPU runs, for both sides
    loaded = load_model(model_dir, device)
    ids = loaded.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]

    def bare() -> float:
        with torch.inference_mode():
            t0 = time.perf_counter()
            x = torch.tensor([ids] * batch, device=device)
            out = loaded.model(input_ids=x, past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)
            cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            for _ in range(tokens - 1):
                out = loaded.model(input_ids=nxt, past_key_values=cache, use_cache=True)
                cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            nxt.tolist()  # waits for the device, as the engine's reading of each token does
            return batch * tokens / (time.perf_counter() - t0)

    async def engine_rate() -> float:
        engine = Engine(loaded, max_batch_size=batch)

        async def one() -> int:
            req = GenerateRequest(ids, tokens, Sampling(temperature=0), ignore_eos=True)
            return sum([len(step.tokens) async for step in engine.generate(req)])

        await asyncio.gather(*[one() for _ in range(batch)])  # warm-up
        t0 = time.perf_counter()
        done = await asyncio.gather(*[one() for _ in range(batch)])
        return sum(done) / (time.perf_counter() - t0)

    bare()  # warm-up
    rates = []
    for i in range(pairs):
        if i % 2:
            b = bare()
            rates.append((asyncio.run(engine_rate()), b))
        else:
            rates.append((asyncio.run(engine_rate()), bare()))
    return (statistics.median(r[0] for r in rates), statistics.median(r[1] for r in rates),
            statistics.median(e / b for e, b in rates))


def engine_vs_bare_alone(model_dir: str) -> tuple[float, float, float]:
    """`engine_vs_bare` in a fresh process."""
    import subprocess

    code = f"import bench.serve as b; print(*b.engine_vs_bare({model_dir!r}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    engine, bare, ratio = out.stdout.strip().splitlines()[-1].split()
    return float(engine), float(bare), float(ratio)


_PEAK = """
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from llm.serve.batch import PaddedBatch

def status_kb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1])

# A Llama-3-sized vocabulary and a 2,048-token context on a narrow body: the logits dominate, as they do
# in a prefill of full-context prompts on a real model.
cfg = LlamaConfig(vocab_size=128_256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048)
model = LlamaForCausalLM(cfg).eval()
torch.set_num_threads(2)
open("/proc/self/clear_refs", "w").write("5")  # reset the peak RSS (VmHWM) to the current RSS
before = status_kb("VmRSS")
PaddedBatch(model).prefill([[5] * 2048] * 16, 0, every_position=sys.argv[1] == "every")
print((status_kb("VmHWM") - before) / 1024)
"""


def prefill_peak_mb(keep: str) -> float:
    """Peak RSS growth (MB) of a fresh process prefilling 16 full-context prompts."""
    import subprocess

    out = subprocess.run([sys.executable, "-c", _PEAK, keep], capture_output=True, text=True, check=True, cwd=ROOT)
    return float(out.stdout.strip().splitlines()[-1])


def serve_floor_ms(port: int, n: int) -> float:
    """p50 ms a trivial FastAPI app on Serve adds over the same app in-process: Serve's own floor here."""
    import httpx
    from fastapi import FastAPI
    from ray import serve

    app = FastAPI()

    @app.post("/echo")
    async def echo() -> dict[str, int]:
        return {"ok": 1}

    @serve.deployment
    @serve.ingress(app)
    class Floor:
        pass

    serve.run(Floor.bind(), name="floor", route_prefix="/floor")

    def p50(client: httpx.Client, url: str) -> float:
        times = []
        for i in range(n + 5):
            t0 = time.perf_counter()
            client.post(url, json={"x": 1})
            if i >= 5:
                times.append(time.perf_counter() - t0)
        return _p50(times)

    try:
        with httpx.Client() as c:
            through = p50(c, f"http://127.0.0.1:{port}/floor/echo")

        async def local() -> float:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://l") as c:
                times = []
                for i in range(n + 5):
                    t0 = time.perf_counter()
                    await c.post("/echo", json={"x": 1})
                    if i >= 5:
                        times.append(time.perf_counter() - t0)
                return _p50(times)

        return (through - asyncio.run(local())) * 1e3
    finally:
        serve.delete("floor")


def main(argv: list[str]) -> int:
    import openai

    from llm.loading import load_config
    from llm.raycluster import use_serve_ingress
    from llm.serve.stage import run

    latency_only = "--latency-only" in argv  # one ingress's latency lines, in a process of their own
    overrides = [a for a in argv if "=" in a]
    config = next((a for a in argv if "=" not in a and not a.startswith("--")), None)
    if not any(o.startswith("serve.model=") for o in overrides):
        from tests.serve.conftest import build_tiny_model

        overrides.append(f"serve.model={build_tiny_model(Path(tempfile.mkdtemp(prefix='llmray-bench-')))}")
    loaded = load_config(config, [*overrides, "serve.name=tiny", "serve.foreground=false",
                                  "serve.min_replicas=1", "serve.max_replicas=1",
                                  f"storage={tempfile.mkdtemp(prefix='llmray-bench-runs-')}"])
    ingress = loaded.llm.serve.ingress
    use_serve_ingress(loaded.llm)  # Serve's settings for this ingress, before Ray and Serve start here
    import ray
    from ray import serve

    # A private Ray: never measure (or shut down Serve on) a cluster someone else runs on this machine.
    ray.init(address="local", num_cpus=loaded.llm.ray.num_cpus, include_dashboard=False, log_to_driver=False)
    result = run(loaded.llm)
    try:
        client = openai.OpenAI(base_url=result.metrics["url"], api_key="x", max_retries=0, timeout=120)
        model_dir = next(iter(result.metrics["models"].values()))
        through = endpoint_p50(client, 60)
        local = in_process_p50(model_dir, 60, loaded.llm.serve)
        added_ms = (through - local) * 1e3
        print(f"added latency p50 (1-token completion, concurrency 1, serve.ingress: {ingress}): endpoint "
              f"{through * 1e3:.2f} ms - in-process {local * 1e3:.2f} ms = {added_ms:.2f} ms (goal <= 5)", flush=True)
        if not latency_only:
            rate1, ttft1 = streams(client, 1, 6)
            rate16, ttft16 = streams(client, 16, 2)
            print(f"batching: {rate16:.0f} tokens/s at 16 streams / {rate1:.0f} at 1 = {rate16 / rate1:.2f} "
                  "(goal >= 4)")
            print(f"time to first token p50: {ttft16 * 1e3:.1f} ms at 16 / {ttft1 * 1e3:.1f} ms at 1 = "
                  f"{ttft16 / ttft1:.2f} (no goal yet)")
        floor = serve_floor_ms(loaded.llm.serve.port, 60)
        print(f"Serve's own floor here (serve.ingress: {ingress}; a trivial FastAPI app on Serve minus in-process): "
              f"{floor:.2f} ms; llmray over that floor: {added_ms - floor:.2f} ms", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    if latency_only:
        return 0
    if ingress == "proxy":  # the same lines through HAProxy, in a fresh process (Serve reads it at start)
        import subprocess

        cmd = [sys.executable, str(Path(__file__).resolve()), *([config] if config else []), *overrides,
               "serve.ingress=haproxy", "--latency-only"]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout
        print("\n".join(x for x in out.splitlines() if x.startswith(("added latency", "Serve's own floor"))))
    # The engine and the bare loop alone in a fresh process (nothing of Ray's left beside them), on equal terms.
    engine_rate, bare_rate, ratio = engine_vs_bare_alone(model_dir)
    print(f"engine efficiency: {engine_rate:.0f} tokens/s engine at 16 concurrent / {bare_rate:.0f} bare batched "
          f"decode at batch 16 (medians), median of 5 side-by-side pairs = {ratio:.2f} (goal >= 0.85)")
    last, every = prefill_peak_mb("last"), prefill_peak_mb("every")
    print(f"replica peak memory growth, prefill of 16 x 2,048-token prompts (128k vocabulary): {last:,.0f} MB "
          f"keeping the last position's logits / {every:,.0f} MB keeping every position's = "
          f"{last / max(every, 1e-9):.3f} (goal <= 0.5)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
