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
    monkeypatch.setattr(broken_service.engines["tiny"].batch, "model", broken)
    with pytest.raises(RuntimeError, match="weights gone"):
        asyncio.run(broken_service.check())


def test_health_check_answers_at_once_while_the_batch_is_busy(loaded, monkeypatch: pytest.MonkeyPatch) -> None:
    """Today's check queued a one-token generation behind every request in flight; a busy replica then
    failed its health check and was killed. Now it reads the loop's progress instead."""
    import time

    async def main() -> None:
        engine = Engine(loaded, max_batch_size=1)
        slow = engine.batch.decode

        def decode(tokens):  # a heavily loaded replica: each step takes 50 ms
            time.sleep(0.05)
            return slow(tokens)

        monkeypatch.setattr(engine.batch, "decode", decode)
        ids = engine.tokenizer("class")["input_ids"]
        busy = [asyncio.ensure_future(_run_ids(engine, ids, 20)) for _ in range(3)]  # 1 row, 2 waiting
        await asyncio.sleep(0.2)
        t0 = time.perf_counter()
        await Service({"tiny": engine}, ServeConfig()).check()
        assert time.perf_counter() - t0 < 0.04 and engine.in_flight  # answered without a forward pass
        engine.last_step -= 120  # no step for two minutes while requests are in flight: stalled
        with pytest.raises(RuntimeError, match="has not finished a step"):
            await engine.check()
        await asyncio.gather(*busy)

    asyncio.run(main())


async def _run_ids(engine: Engine, ids: list[int], n: int, **kw) -> tuple[list[int], str | None]:
    tokens, finish = [], None
    async for step in engine.generate(GenerateRequest(ids, n, **kw)):
        tokens += [c.token for c in step.tokens]
        finish = step.finish_reason
    return tokens, finish


def test_a_failing_row_fails_its_request_alone(loaded, monkeypatch: pytest.MonkeyPatch) -> None:
    from llm.serve import sampling
    from llm.serve.protocol import ApiError

    real = sampling.adjust

    def adjust(logits, row):
        if row.sampling.seed == 13:
            raise ValueError("poisoned settings")
        return real(logits, row)

    monkeypatch.setattr(sampling, "adjust", adjust)

    async def main() -> None:
        engine = Engine(loaded, max_batch_size=4)
        ids = engine.tokenizer("class")["input_ids"]
        good = [_run_ids(engine, ids, 8, sampling=Sampling(temperature=0.7, seed=i)) for i in (1, 2)]
        bad = _run_ids(engine, ids, 8, sampling=Sampling(temperature=0.7, seed=13))
        results = await asyncio.gather(*good, bad, return_exceptions=True)
        assert [len(r[0]) for r in results[:2]] == [8, 8]  # type: ignore[index]
        assert isinstance(results[2], ApiError) and "poisoned" in results[2].message

    asyncio.run(main())


def test_tiny_temperature_decodes_greedily_instead_of_nan(loaded) -> None:
    async def main() -> None:
        engine = Engine(loaded, max_batch_size=2)
        ids = engine.tokenizer("class")["input_ids"]
        greedy = await _run_ids(engine, ids, 10, sampling=Sampling(temperature=0))
        tiny = await _run_ids(engine, ids, 10, sampling=Sampling(temperature=1e-40, seed=1))
        assert tiny == greedy

    asyncio.run(main())


def test_stop_token_ids_ignore_eos_and_min_tokens(loaded) -> None:
    async def main() -> None:
        engine = Engine(loaded, max_batch_size=2)
        ids = engine.tokenizer("class")["input_ids"]
        tokens, _ = await _run_ids(engine, ids, 12, sampling=Sampling(temperature=0), ignore_eos=True)
        # stop on the 4th greedy token: the answer ends there with "stop"
        cut, finish = await _run_ids(engine, ids, 12, sampling=Sampling(temperature=0), ignore_eos=True,
                                     stop_ids=frozenset({tokens[3]}))
        assert cut == tokens[: tokens.index(tokens[3]) + 1] and finish == "stop"
        # not before 6 tokens: the stop token is banned until then
        late, _ = await _run_ids(engine, ids, 12, sampling=Sampling(temperature=0), ignore_eos=True,
                                 stop_ids=frozenset({tokens[3]}), min_tokens=6)
        assert len(late) >= 6 and tokens[3] not in late[:6]

    asyncio.run(main())


def test_queued_tokens_limit_is_a_429(loaded) -> None:
    from llm.serve.protocol import ApiError

    async def main() -> None:
        engine = Engine(loaded, max_batch_size=1, max_queued_tokens=50)
        engine.reserve(50)
        with pytest.raises(ApiError) as e:
            engine.reserve(51)
        assert e.value.status == 429

    asyncio.run(main())


def test_prefill_keeps_only_the_last_position(loaded) -> None:
    from llm.serve.batch import PaddedBatch

    batch = PaddedBatch(loaded.model)
    logits = batch.prefill([[5, 6, 7, 8], [9, 10]], 0)
    assert tuple(logits.shape[:2]) == (2, 1)
    assert tuple(PaddedBatch(loaded.model).prefill([[5, 6, 7, 8]], 0, every_position=True).shape[:2]) == (1, 4)


def test_penalties_go_through_transformers_processors() -> None:
    import torch

    from llm.serve.sampling import Row, adjust

    logits = torch.zeros(6)
    row = Row(Sampling(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25,
                       logit_bias={5: 3.0}), prompt=[1], generated=[2, 2])
    out = adjust(logits + 1.0, row)
    # token 1 (prompt): 1 / 2; token 2 (twice generated): 1 / 2 - 2 * 0.25 - 0.5; token 5: 1 + 3
    assert out.tolist() == pytest.approx([1.0, 0.5, -0.5, 1.0, 1.0, 4.0])


def test_text_stream_decodes_incrementally_and_can_keep_the_stop() -> None:
    calls: list[int] = []

    class Counting(_Chars):
        def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
            calls.append(len(ids))
            return super().decode(ids)

    text = "x" * 500 + " the end."
    stream = TextStream(Counting(text), ["end"], include_stop=True)
    out = ""
    for i in range(len(text)):
        piece, stopped = stream.add([i])
        out += piece
        if stopped:
            break
    assert out == "x" * 500 + " the end" and max(calls) <= 3  # never the whole answer again


def test_rows_sampled_at_a_temperature_are_drawn_together_from_their_own_distributions() -> None:
    """Unseeded rows with only a temperature share one softmax and one multinomial: each row still draws from
    softmax(logits / its temperature); a seeded row keeps its own generator; a row with no possible token
    fails alone."""
    import torch

    from llm.serve.sampling import Row, sample

    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1, 0.0], [0.1, 0.1, 0.1, 0.7], [0.25, 0.25, 0.25, 0.25]]))
    logits[2] = float("nan")
    hot, cold = Sampling(temperature=1.0), Sampling(temperature=0.5)
    counts = torch.zeros(2, 4)
    for _ in range(4000):
        first, second, bad = sample(logits, [Row(hot, [1], []), Row(cold, [1], []), Row(Sampling(), [1], [])])
        counts[0, first.token] += 1
        counts[1, second.token] += 1
        assert isinstance(bad, Exception)
    want = torch.softmax(logits[:2] / torch.tensor([[1.0], [0.5]]), -1)
    assert (counts / 4000 - want).abs().max() < 0.03, counts / 4000
    seeded = [sample(logits[:1], [Row(Sampling(temperature=1.0, seed=7), [1], [])])[0].token for _ in range(2)]
    again = [sample(logits[:1], [Row(Sampling(temperature=1.0, seed=7), [1], [])])[0].token for _ in range(2)]
    assert seeded == again  # a fresh seeded request repeats its draws



def test_a_fuller_batch_takes_more_steps_per_trip_within_the_budget(loaded) -> None:
    """One stream takes 2 steps per trip, 16 streams 8 (fewer chunks per token for the proxy to carry); a slow
    model's trip stays within the budget; 16 streams then get the tokens each gets alone."""
    engine = Engine(loaded)
    for running, steps in ((1, 2), (6, 3), (16, 8), (64, 8)):
        engine._running = [object()] * running  # type: ignore[list-item]
        engine._step_s = 0.001
        assert engine._steps_per_trip() == steps
        engine._step_s = 0.02  # 20 ms a step: only the fewest (2) fit the 50 ms budget
        assert engine._steps_per_trip() == 2

    async def main() -> tuple[list[int], list[list[int]]]:
        engine = Engine(loaded, max_batch_size=16)
        alone = (await _run(engine, "def", 24))[0]
        together = await asyncio.gather(*[_run(engine, "def", 24) for _ in range(16)])
        return alone, [t for t, _ in together]

    alone, together = asyncio.run(main())
    assert len(alone) == 24 and all(t == alone for t in together)


def test_plain_greedy_rows_run_a_trip_on_the_device_and_end_as_alone(loaded, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch whose every row is plain greedy runs each trip's steps with the tokens left on the device
    (`Engine._decode_greedy`): each row still ends where it ends alone, at its own budget inside a trip or
    at its own stop token, with the same tokens and finish reason. (The tiny random model repeats its first
    greedy token, so a stop token ends its row at that first token.)"""
    trips: list[int] = []
    real = Engine._decode_greedy

    def counted(self: Engine, steps: int):
        trips.append(steps)
        return real(self, steps)

    monkeypatch.setattr(Engine, "_decode_greedy", counted)
    greedy = Sampling(temperature=0)

    async def main() -> tuple[list, list]:
        engine = Engine(loaded, max_batch_size=8)
        ids = [engine.tokenizer(p)["input_ids"] for p in PROMPTS * 2]
        free = [await _run_ids(engine, i, 4, sampling=greedy, ignore_eos=True) for i in ids]
        budgets = [24, 11, 9, 24, 3, 22, 17, 24]  # most end inside a trip of 3 or 4 steps
        asks = [{"stop_ids": frozenset({free[7][0][0]})} if k == 7 else {} for k in range(8)]
        alone = [await _run_ids(engine, i, n, sampling=greedy, ignore_eos=True, **a)
                 for i, n, a in zip(ids, budgets, asks, strict=True)]
        trips.clear()
        together = await asyncio.gather(*[_run_ids(engine, i, n, sampling=greedy, ignore_eos=True, **a)
                                          for i, n, a in zip(ids, budgets, asks, strict=True)])
        return alone, together

    alone, together = asyncio.run(main())
    assert together == alone
    assert [len(t) for t, _ in alone[:7]] == [24, 11, 9, 24, 3, 22, 17]
    assert all(f == "length" for _, f in alone[:7]) and alone[7][1] == "stop"
    assert trips and max(trips) > 2  # the batch of 8 took several steps per trip on the greedy path
