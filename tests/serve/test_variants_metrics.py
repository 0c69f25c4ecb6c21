"""In-process (no Ray): the engine serves compressed variants with `generate`'s greedy tokens and right usage,
the per-request recorder's figures and log line, and the vLLM route's refusals before vLLM is imported."""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from llm.compress.variants import build_int8, build_pruned
from llm.config import ServeConfig
from llm.errors import ConfigError
from llm.loading import load_config
from llm.models.load import LoadedModel, load_model
from llm.serve.engine import Engine, GenerateRequest, RequestStats
from llm.serve.sampling import Sampling
from tests.conftest import ROOT

PROMPTS = ["The for statement", "Objects, values and types are described here in detail so that"]
TOKENS = 12
# The default 0.02 init makes the tiny model repeat one token forever, so equal outputs would prove little;
# wider weights give varied tokens (checked below).
WEIGHT_STD = 0.3


def _widened(src: Path, folder: Path) -> Path:
    loaded = load_model(src)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in loaded.model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, WEIGHT_STD)
    loaded.model.save_pretrained(str(folder), safe_serialization=True)
    loaded.tokenizer.save_pretrained(str(folder))
    return folder


def _calibration(tokenizer: Any) -> Any:
    from tests.compress.conftest import calibration_ids

    return calibration_ids(tokenizer)


@pytest.fixture(scope="module")
def variants(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Int8 and pruned variant folders of a tiny Llama, built by the compress stage's own builders."""
    root = tmp_path_factory.mktemp("variants")
    src = _widened(tiny_model_dir, root / "source")
    calib = _calibration(load_model(src).tokenizer)
    return {"int8": build_int8(src, root / "int8", calib, embeddings=True, device="cpu",
                               gpu_config="int8_weight_only"),
            "pruned": build_pruned(src, root / "pruned", calib, mlp_ratio=0.5, head_ratio=0.5, multiple=8)}


@pytest.fixture(scope="module", params=["int8", "pruned"])
def variant(request: pytest.FixtureRequest, variants: dict[str, Path]) -> LoadedModel:
    """A variant opened by the loader the server uses."""
    loaded = load_model(variants[request.param])
    assert loaded.format == {"int8": "int8-dynamic", "pruned": "hf"}[request.param]
    return loaded


def _ids(loaded: LoadedModel, prompt: str) -> list[int]:
    return list(loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"])  # as the completions route


def _greedy(loaded: LoadedModel, prompts: list[list[int]], eos: set[int]) -> list[list[int]]:
    """`generate`'s greedy tokens of prompts decoded together, left-padded like the engine's batch, each cut
    after its first end-of-sequence token."""
    pad = int(loaded.tokenizer.pad_token_id)
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    # Saved models say use_cache=False (a training setting): without the KV cache `generate` recomputes every
    # position each step, which int8's per-call activation scales turn into other tokens than a cached decode.
    with torch.inference_mode():
        out = loaded.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=TOKENS, do_sample=False,
                                    use_cache=True, pad_token_id=pad)
    rows = out[:, width:].tolist()
    return [row[:next((i + 1 for i, t in enumerate(row) if t in eos), len(row))] for row in rows]


async def _tokens(engine: Engine, ids: list[int]) -> tuple[list[int], str | None]:
    tokens, finish = [], None
    async for step in engine.generate(GenerateRequest(ids, TOKENS, Sampling(temperature=0))):
        tokens += [c.token for c in step.tokens]
        finish = step.finish_reason
    return tokens, finish


def _finish(tokens: list[int], eos: set[int]) -> str:
    return "stop" if tokens and tokens[-1] in eos else "length"


def test_variant_alone_gives_generates_greedy_tokens_and_counts(variant: LoadedModel) -> None:
    finished: list[RequestStats] = []
    engine = Engine(variant, max_batch_size=4, on_finish=finished.append)
    prompts = [_ids(variant, p) for p in PROMPTS]

    async def main() -> list[tuple[list[int], str | None]]:
        return [await _tokens(engine, ids) for ids in prompts]

    got = asyncio.run(main())
    for ids, (tokens, finish), stats in zip(prompts, got, finished, strict=True):
        want = _greedy(variant, [ids], engine.eos)[0]
        assert len(set(want)) > 3  # varied tokens, not one repeated
        assert tokens == want
        assert finish == _finish(want, engine.eos)
        assert (stats.prompt_tokens, stats.tokens) == (len(ids), len(want))


def test_variant_concurrent_requests_give_generates_greedy_tokens(variant: LoadedModel) -> None:
    finished: list[RequestStats] = []
    engine = Engine(variant, max_batch_size=4, on_finish=finished.append)
    prompts = [_ids(variant, p) for p in PROMPTS]

    async def main() -> list[tuple[list[int], str | None]]:
        return list(await asyncio.gather(*[_tokens(engine, ids) for ids in prompts]))

    got = asyncio.run(main())
    assert finished[0].first_token == finished[1].first_token  # prefilled together: one batch throughout
    if variant.format == "int8-dynamic":
        # Dynamic int8 scales activations per tensor, i.e. over every row in the batch: a row's tokens depend on
        # its batch mates, so the reference is `generate` over the same two rows, not each prompt alone.
        want = _greedy(variant, prompts, engine.eos)
    else:
        want = [_greedy(variant, [ids], engine.eos)[0] for ids in prompts]
    assert [t for t, _ in got] == want
    assert [f for _, f in got] == [_finish(w, engine.eos) for w in want]
    assert sorted((s.prompt_tokens, s.tokens) for s in finished) == sorted(
        (len(p), len(w)) for p, w in zip(prompts, want, strict=True))


def test_variant_completion_usage_through_the_app(variant: LoadedModel) -> None:
    from llm.serve.routes import create_app
    from llm.serve.service import Service

    engine = Engine(variant, max_batch_size=4)
    app = create_app(Service({"tiny": engine}, ServeConfig()))
    body = {"model": "tiny", "prompt": PROMPTS, "max_tokens": TOKENS, "temperature": 0}

    async def main() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as http:
            return await http.post("/v1/completions", json=body)

    reply = asyncio.run(main())
    assert reply.status_code == 200, reply.text
    out = reply.json()
    prompts = [_ids(variant, p) for p in PROMPTS]
    want = _greedy(variant, prompts, engine.eos)  # the two choices run concurrently, prefilled together
    assert out["usage"] == {"prompt_tokens": sum(map(len, prompts)), "completion_tokens": sum(map(len, want)),
                            "total_tokens": sum(map(len, prompts)) + sum(map(len, want))}
    for choice, tokens in zip(sorted(out["choices"], key=lambda c: c["index"]), want, strict=True):
        assert choice["text"] == variant.tokenizer.decode(tokens, skip_special_tokens=True)
        assert choice["finish_reason"] == _finish(tokens, engine.eos)


class _Lines(logging.Handler):
    """The recorder's log records (Serve's logger may not propagate to pytest's capture)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.pathname.endswith("metrics.py"):
            self.records.append(record)


@pytest.fixture
def serve_log() -> Any:
    import ray.serve.metrics  # noqa: F401 - importing Serve sets up its logger's handlers: add ours after

    logger = logging.getLogger("ray.serve")
    handler, level = _Lines(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture
def observed(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, float, dict[str, str]]]:
    """(metric, value, tags) of every observation: Ray's metric objects are real, only their export is spied
    on (creating and recording them needs no running Ray; exporting them does)."""
    from ray.util import metrics

    seen: list[tuple[str, float, dict[str, str]]] = []

    def spy(self: Any, value: float, tags: dict[str, str] | None = None) -> None:
        seen.append((self._name, value, dict(tags or {})))

    monkeypatch.setattr(metrics.Histogram, "observe", spy)
    monkeypatch.setattr(metrics.Counter, "inc", spy)
    return seen


def test_stats_and_log_line_from_known_timestamps(serve_log: _Lines, observed: list[Any]) -> None:
    from llm.serve.metrics import request_recorder

    stats = RequestStats(prompt_tokens=3, tokens=5, submitted=1.0, admitted=1.1, first_token=1.3, finished=1.7)
    request_recorder("m")(stats)
    assert (stats.queue_s, stats.ttft_s, stats.tokens_per_s) == pytest.approx((0.1, 0.3, 10.0))  # 4 after the first
    assert [r.getMessage() for r in serve_log.records] == [
        "m: prompt 3 tokens, generated 5, queue 100.0 ms, ttft 300.0 ms, 10.0 tokens/s"]
    assert {name: value for name, value, _ in observed} == pytest.approx(
        {"llm_time_to_first_token_s": 0.3, "llm_queue_time_s": 0.1, "llm_tokens_per_s": 10.0,
         "llm_generated_tokens": 5})


def test_recorder_on_real_requests(variants: dict[str, Path], serve_log: _Lines, observed: list[Any]) -> None:
    from llm.serve.metrics import request_recorder

    loaded = load_model(variants["pruned"])
    finished: list[RequestStats] = []
    record = request_recorder("tiny")

    def on_finish(stats: RequestStats) -> None:
        finished.append(stats)
        record(stats)

    engine = Engine(loaded, max_batch_size=1, on_finish=on_finish)  # one row: the second request queues
    prompts = [_ids(loaded, p) for p in PROMPTS]

    async def main() -> list[Any]:
        return list(await asyncio.gather(*[_tokens(engine, ids) for ids in prompts]))

    start = time.perf_counter()
    got = asyncio.run(main())
    wall = time.perf_counter() - start
    assert len(finished) == len(serve_log.records) == 2
    for stats, (tokens, _) in zip(finished, got, strict=True):
        total = stats.finished - stats.submitted
        assert stats.tokens == len(tokens) > 1
        assert 0 <= stats.queue_s <= stats.ttft_s <= total <= wall
        assert stats.ttft_s > 0
        decode = stats.finished - stats.first_token
        assert stats.tokens_per_s == pytest.approx((stats.tokens - 1) / decode, rel=1e-9)
        assert stats.tokens_per_s >= (stats.tokens - 1) / wall  # decoding is part of the wall time
    assert finished[1].queue_s > finished[0].queue_s  # it waited for the one row
    for stats, line in zip(finished, serve_log.records, strict=True):
        text = line.getMessage()
        assert "\n" not in text and text.startswith(f"tiny: prompt {stats.prompt_tokens} tokens, generated "
                                                    f"{stats.tokens}, queue {stats.queue_s * 1e3:.1f} ms")
        assert f"ttft {stats.ttft_s * 1e3:.1f} ms, {stats.tokens_per_s:.1f} tokens/s" in text
    by_name: dict[str, list[float]] = {}
    for name, value, tags in observed:
        assert tags["model"] == "tiny"
        by_name.setdefault(name, []).append(value)
    assert by_name["llm_time_to_first_token_s"] == [s.ttft_s for s in finished]
    assert by_name["llm_queue_time_s"] == [s.queue_s for s in finished]
    assert by_name["llm_tokens_per_s"] == [s.tokens_per_s for s in finished]
    assert sum(by_name["llm_generated_tokens"]) == sum(s.tokens for s in finished)


def _gpu_config() -> Any:
    cfg = load_config(ROOT / "cluster" / "config.yaml").llm
    assert any((t.get("resources") or {}).get("GPU") for t in cfg.cluster()["available_node_types"].values())
    return cfg


def _cpu_only(cfg: Any) -> Any:
    cluster = copy.deepcopy(cfg.cluster())
    for spec in cluster["available_node_types"].values():
        (spec.get("resources") or {}).pop("GPU", None)
    cfg._cluster = cluster
    return cfg


@pytest.mark.parametrize("where", ["node types", "local"])
def test_vllm_refuses_a_cluster_without_gpus(where: str, tiny_model_dir: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from llm.serve.vllm import build_vllm_app
    from tests.conftest import tiny_config

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # a local cluster is this machine: no GPU visible
    cfg = _cpu_only(_gpu_config()) if where == "node types" else tiny_config(tmp_path).llm
    with pytest.raises(ConfigError, match=r"^metadata\.llm\.serve\.engine: vllm needs GPUs") as err:
        build_vllm_app(cfg, {"tiny": str(tiny_model_dir)}, {})
    assert "\n" not in str(err.value) and "engine: torch" in str(err.value)


def test_vllm_refuses_an_int8_variant(variants: dict[str, Path]) -> None:
    from llm.serve.vllm import build_vllm_app

    models = {"small": str(variants["pruned"]), "q": str(variants["int8"])}
    with pytest.raises(ConfigError, match=r"^metadata\.llm\.serve\.engine: vllm cannot load model 'q'") as err:
        build_vllm_app(_gpu_config(), models, {})
    assert "int8-dynamic" in str(err.value) and "\n" not in str(err.value)


def test_vllm_accepts_a_gpu_cluster_and_a_hf_variant(variants: dict[str, Path]) -> None:
    import importlib.util

    from llm.serve.vllm import build_vllm_app, check_vllm_config

    cfg, models = _gpu_config(), {"small": str(variants["pruned"])}
    check_vllm_config(cfg, models)
    if importlib.util.find_spec("vllm") is None:  # only then does the route go on to its install check
        with pytest.raises(ConfigError, match="vllm is not installed"):
            build_vllm_app(cfg, models, {})
