"""The continuous-batching engine in-process (no Ray): batched rows decode exactly as alone, late joiners,
cancellation frees rows, stop strings, the health check."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from llm.config import ServeConfig
from llm.models.load import load_model
from llm.serve.engine import Engine, GenerateRequest
from llm.serve.sampling import Sampling
from llm.serve.service import Service
from llm.serve.text import TextStream

PROMPTS = ["The for statement", "class", "Objects, values and types are described here in detail so that", "x"]


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path):
    return load_model(tiny_model_dir)


async def _run(engine: Engine, prompt: str, n: int, delay: float = 0.0) -> tuple[list[int], list[float]]:
    await asyncio.sleep(delay)
    ids = engine.tokenizer(prompt)["input_ids"]
    tokens, logprobs = [], []
    async for step in engine.generate(GenerateRequest(ids, n, Sampling(temperature=0, top_logprobs=0))):
        tokens += [c.token for c in step.tokens]
        logprobs += [c.logprob for c in step.tokens]
    return tokens, logprobs


def test_batched_rows_decode_as_alone_even_when_joining_late(loaded) -> None:
    async def main() -> None:
        engine = Engine(loaded, max_batch_size=3)  # 4 prompts, 3 rows: one waits for a free row
        alone = [await _run(engine, p, 20) for p in PROMPTS]
        together = await asyncio.gather(*[_run(engine, p, 20, delay=0.002 * i) for i, p in enumerate(PROMPTS)])
        for (a_tok, a_lp), (b_tok, b_lp) in zip(alone, together, strict=True):
            assert a_tok == b_tok
            assert b_lp == pytest.approx(a_lp, abs=1e-4)

    asyncio.run(main())


def test_cancelled_request_leaves_the_batch(loaded) -> None:
    async def main() -> None:
        engine = Engine(loaded, max_batch_size=4)
        ids = engine.tokenizer("class")["input_ids"]
        stream = engine.generate(GenerateRequest(ids, 100, Sampling(temperature=0)))
        await stream.__anext__()
        await stream.aclose()  # the client went away
        await _run(engine, "x", 3)  # one more step runs the scheduler past the cancellation
        assert engine.in_flight == 0 and engine.batch.rows == 0

    asyncio.run(main())


class _Chars:
    """A tokenizer stand-in: token i is the i-th character of `text` (decode is pure string work)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(self.text[i] for i in ids)


def test_text_stream_holds_back_a_possible_stop_then_cuts() -> None:
    text = "hello END world"
    stream = TextStream(_Chars(text), ["END"])
    sent = []
    for i in range(len(text)):
        piece, stopped = stream.add([i])
        sent.append(piece)
        if stopped:
            break
    assert "".join(sent) == "hello " and stopped
    assert sent[6] == "" and sent[7] == ""  # "E", "EN" could be the stop: not sent yet


def test_text_stream_releases_a_false_alarm() -> None:
    stream = TextStream(_Chars("aENb"), ["END"])
    pieces = [stream.add([i])[0] for i in range(4)]
    assert "".join(pieces) == "aENb"


def test_health_check_fails_when_the_model_cannot_generate(loaded, monkeypatch: pytest.MonkeyPatch) -> None:
    service = Service({"tiny": Engine(loaded)}, ServeConfig())
    asyncio.run(service.check())

    def broken(*args, **kwargs):
        raise RuntimeError("weights gone")

    broken_service = Service({"tiny": Engine(loaded)}, ServeConfig())
    monkeypatch.setattr(broken_service.engines["tiny"].batch, "_forward", broken)
    with pytest.raises(RuntimeError, match="weights gone"):
        asyncio.run(broken_service.check())
