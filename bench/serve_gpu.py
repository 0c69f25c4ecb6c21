"""Serving on a GPU without Ray: the OpenAI app and its engine on CUDA, driven by the real `openai` client
in this process (httpx's ASGI transport), then engine efficiency against a bare decode loop on the device.

    python bench/serve_gpu.py [--layers 12] [--width 768]
    python bench/serve_gpu.py --device cpu --layers 2 --width 64     # a CPU smoke run of the same checks

Every decoding path runs on the GPU and is checked, not only timed: greedy (equal to `transformers`'
`generate` on the same weights), temperature / top-p / top-k / min-p sampling, repetition, presence and
frequency penalties, `logit_bias`, per-request `seed` (the same seed gives the same text, in a batch of
other requests too), `n=2`, logprobs and `top_logprobs`, `echo` with prompt logprobs, a temperature below
the greedy floor, streaming, and sixteen sampled and greedy streams batched together. Ray Serve itself is
not on the device machine; the app here is the one a replica builds (`LLMServer`), served in-process.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.serve import PROMPT, engine_vs_bare  # noqa: E402  (the checkout's root is on the path first)


def build(folder: Path, layers: int, width: int) -> Path:
    """The tests' trained BPE with a `layers` x `width` Llama of random weights (context 1,024)."""
    from transformers import AutoTokenizer

    from llm.config import ModelConfig
    from llm.train.model import build_model
    from tests.serve.conftest import VOCAB, build_tiny_model

    build_tiny_model(folder)
    tok = AutoTokenizer.from_pretrained(str(folder))
    spec = ModelConfig(arch="llama", n_layers=layers, d_model=width, n_heads=max(1, width // 64), context=1024)
    build_model(spec, VOCAB, seed=0, tokenizer=tok).save_pretrained(str(folder), safe_serialization=True)
    return folder


def check(name: str, ok: bool, detail: str = "") -> bool:
    print(f"  {'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)
    return ok


async def conformance(model_dir: Path, device: str) -> bool:
    """The app on CUDA through the `openai` client; True when every check passed."""
    import httpx
    import openai
    import torch

    from llm.config.serve import ServeConfig
    from llm.models.load import load_model
    from llm.serve.engine import Engine
    from llm.serve.routes import create_app
    from llm.serve.service import Service

    cfg = ServeConfig(model=str(model_dir), name="m", max_batch_size=16)
    loaded = load_model(model_dir, device)
    print(f"model on {next(loaded.model.parameters()).device} ({next(loaded.model.parameters()).dtype}), "
          f"{sum(p.numel() for p in loaded.model.parameters()) / 1e6:.1f}M parameters", flush=True)
    app = create_app(Service({"m": Engine(loaded, cfg.max_batch_size)}, cfg))
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1", timeout=120)
    client = openai.AsyncOpenAI(base_url="http://127.0.0.1/v1", api_key="x", http_client=http, max_retries=0)
    results = []

    async def complete(**kw):
        return await client.completions.create(**{"model": "m", "prompt": PROMPT, "max_tokens": 24, **kw})

    # Greedy equals transformers' generate on the same weights and device.
    got = await complete(temperature=0, extra_body={"ignore_eos": True})
    ids = torch.tensor([loaded.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]], device=device)
    with torch.inference_mode():
        ref = loaded.model.generate(ids, max_new_tokens=24, do_sample=False, min_new_tokens=24,
                                    pad_token_id=loaded.tokenizer.pad_token_id)
    want = loaded.tokenizer.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)
    same = next((i for i, (a, b) in enumerate(zip(got.choices[0].text, want, strict=False)) if a != b),
                min(len(want), len(got.choices[0].text)))
    dtype = str(next(loaded.model.parameters()).dtype).removeprefix("torch.")
    results.append(check(f"greedy = transformers generate ({dtype}, same device)", got.choices[0].text == want,
                         f"equal for {same} of {len(want)} characters"))

    sampled = dict(temperature=0.8, top_p=0.9, extra_body={"top_k": 40, "min_p": 0.02, "repetition_penalty": 1.1})
    a, b = await asyncio.gather(complete(seed=7, **sampled), complete(seed=7, **sampled))
    others = await asyncio.gather(complete(seed=7, **sampled), *[complete(**sampled) for _ in range(6)])
    results.append(check("seeded sampling repeats, alone and in a batch of unseeded requests",
                         a.choices[0].text == b.choices[0].text == others[0].choices[0].text))
    results.append(check("unseeded sampling varies", len({o.choices[0].text for o in others[1:]}) > 1))
    pen = await complete(temperature=1.0, presence_penalty=1.5, frequency_penalty=0.5, seed=1)
    results.append(check("presence and frequency penalties sample", bool(pen.choices[0].text)))
    forced = loaded.tokenizer(" for", add_special_tokens=False)["input_ids"][0]
    bias = await complete(temperature=1.0, logit_bias={str(forced): 100}, max_tokens=8)
    results.append(check("logit_bias +100 forces its token", bias.choices[0].text == " for" * 8,
                         repr(bias.choices[0].text)))
    two = await complete(temperature=1.0, n=2, seed=3)
    results.append(check("n=2", len(two.choices) == 2 and {c.index for c in two.choices} == {0, 1}))
    lp = await complete(temperature=0.7, logprobs=3, max_tokens=6, extra_body={"ignore_eos": True})
    tops = lp.choices[0].logprobs.top_logprobs
    results.append(check("completion logprobs=3", len(tops) == 6 and all(1 <= len(t) <= 4 for t in tops)
                         and all(v <= 0 for v in lp.choices[0].logprobs.token_logprobs)))
    # (a top_logprobs entry is keyed by text: byte-level tokens that decode to the same text share a key)
    echo = await client.completions.create(model="m", prompt=PROMPT, max_tokens=1, echo=True, logprobs=1,
                                           temperature=0)
    results.append(check("echo with prompt logprobs", echo.choices[0].logprobs.token_logprobs[0] is None
                         and all(v is not None for v in echo.choices[0].logprobs.token_logprobs[1:])))
    tiny = await complete(temperature=1e-40, extra_body={"ignore_eos": True})
    results.append(check("temperature 1e-40 decodes greedily", tiny.choices[0].text == got.choices[0].text))
    chat = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hello"}],
                                                max_tokens=8, temperature=0.9, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    results.append(check("chat top_logprobs=2", bool(content) and all(len(c.top_logprobs) == 2 for c in content)))
    chunks = [c async for c in await client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=16, temperature=0.9, stream=True,
        stream_options={"include_usage": True})]
    results.append(check("streaming chat with usage", chunks[-1].usage is not None and len(chunks) > 2))
    mixed = await asyncio.gather(*[complete(temperature=0.9 if i % 2 else 0, extra_body={"ignore_eos": True})
                                   for i in range(16)])
    greedy_same = all(m.choices[0].text == got.choices[0].text for m in mixed[0::2])
    results.append(check("16 sampled and greedy requests in one batch; greedy rows unchanged",
                         greedy_same and all(m.usage.completion_tokens == 24 for m in mixed)))
    metrics = (await http.get("/metrics")).text
    results.append(check("/metrics counts the requests", "llmray" in metrics or "request" in metrics))
    await http.aclose()
    return all(results)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args(argv)

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device here: this bench runs on a GPU machine (--device cpu for a smoke run)")
        return 2
    print(f"device: {torch.cuda.get_device_name() if args.device.startswith('cuda') else 'CPU'}", flush=True)
    folder = build(Path(tempfile.mkdtemp(prefix="llmray-serve-gpu-")), args.layers, args.width)
    ok = asyncio.run(conformance(folder, args.device))
    for batch in (16, 64):
        engine, bare, ratio = engine_vs_bare(str(folder), batch=batch, tokens=64, device=args.device)
        print(f"engine efficiency on {args.device} at {batch} streams: engine {engine:,.0f} tokens/s, bare decode loop "
              f"{bare:,.0f} tokens/s: {ratio:.2f} (goal >= 0.85)", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
