"""Continuous batching: requests join the running batch between decoding steps and leave when done.

One asyncio task per model schedules: admit waiting requests (prefilled together, then merged into the
padded batch), run one decode step for every row, hand each row its token, drop finished or cancelled
rows, repeat. Forward passes run in a worker thread so the replica keeps accepting requests and
answering health checks meanwhile; the batch itself is only touched by that one task.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field

from llm.models.load import LoadedModel
from llm.serve.batch import PaddedBatch
from llm.serve.sampling import Choice, Sampling, prompt_logprobs, sample

log = logging.getLogger("ray.serve")


@dataclass
class GenerateRequest:
    """What the engine needs: token ids in, a token budget, decoding settings."""

    prompt: list[int]
    max_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    echo_logprobs: bool = False
    """Also report the prompt tokens' logprobs (completions' `echo` with `logprobs`)."""


@dataclass
class Step:
    """One event of a stream: new tokens, the prompt's logprobs (first event, when asked), a finish."""

    tokens: list[Choice] = field(default_factory=list)
    prompt: list[Choice] | None = None
    finish_reason: str | None = None


@dataclass
class RequestStats:
    """Per-request timings for Serve's metrics and logs."""

    prompt_tokens: int
    tokens: int = 0
    submitted: float = field(default_factory=time.perf_counter)
    admitted: float | None = None
    first_token: float | None = None
    finished: float | None = None

    @property
    def queue_s(self) -> float:
        return (self.admitted or self.submitted) - self.submitted

    @property
    def ttft_s(self) -> float:
        return (self.first_token or self.submitted) - self.submitted

    @property
    def tokens_per_s(self) -> float:
        span = (self.finished or 0.0) - (self.first_token or 0.0)
        return (self.tokens - 1) / span if self.tokens > 1 and span > 0 else 0.0


class Sequence:
    """One request in flight: its queue of steps, its budget, its state in the batch."""

    def __init__(self, req: GenerateRequest) -> None:
        self.req = req
        self.queue: asyncio.Queue[Step | BaseException] = asyncio.Queue()
        self.stats = RequestStats(prompt_tokens=len(req.prompt))
        self.last = -1
        self.done = False
        self.cancelled = False

    def cancel(self) -> None:
        """Leave the batch at the next step (client gone, stop string found)."""
        self.cancelled = True


class Engine:
    """Continuous-batching generation over one loaded model."""

    def __init__(self, loaded: LoadedModel, max_batch_size: int = 16,
                 on_finish: Callable[[RequestStats], None] | None = None) -> None:
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.max_batch_size = max_batch_size
        self.on_finish = on_finish
        self.context = loaded.context
        self.batch = PaddedBatch(loaded.model)
        self.eos = _eos_ids(loaded)
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (min(self.eos) if self.eos else 0))
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def in_flight(self) -> int:
        return len(self._waiting) + len(self._running)

    def submit(self, req: GenerateRequest) -> Sequence:
        """Queue a request; it joins the running batch at the next step with a free row."""
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()  # bound to the running loop
            self._task = asyncio.get_running_loop().create_task(self._loop())
        seq = Sequence(req)
        self._waiting.append(seq)
        self._wake.set()
        return seq

    async def generate(self, req: GenerateRequest) -> AsyncGenerator[Step, None]:
        """Steps of one request until it finishes; leaving early (break, disconnect) frees its row."""
        seq = self.submit(req)
        try:
            while True:
                item = await seq.queue.get()
                if isinstance(item, BaseException):
                    raise item
                item = _coalesce(item, seq.queue)
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            seq.cancel()

    async def _loop(self) -> None:
        while True:
            if not self._running and not self._waiting:
                self._wake.clear()
                await self._wake.wait()
            joining = self._admit()
            try:
                if joining:
                    self._deliver(await asyncio.to_thread(self._prefill, joining))
                if self._running:
                    self._deliver(await asyncio.to_thread(self._decode))
            except Exception as e:  # the model failed: fail what is in flight, keep serving the rest
                log.exception("generation failed")
                for seq in [*self._running, *joining]:
                    seq.queue.put_nowait(e)
                self._running = []
                self.batch.keep([])

    def _admit(self) -> list[Sequence]:
        joining: list[Sequence] = []
        while self._waiting and len(self._running) + len(joining) < self.max_batch_size:
            seq = self._waiting.popleft()
            if not seq.cancelled:
                seq.stats.admitted = time.perf_counter()
                joining.append(seq)
        return joining

    def _prefill(self, joining: list[Sequence]) -> list[tuple[Sequence, Step]]:
        logits = self.batch.prefill([s.req.prompt for s in joining], self.pad_id)
        self._running += joining
        events = []
        for seq, row in zip(joining, logits, strict=True):
            step = Step()
            if seq.req.echo_logprobs:
                real = row[row.shape[0] - len(seq.req.prompt):]
                step.prompt = prompt_logprobs(real, seq.req.prompt, seq.req.sampling.top_logprobs or 0)
            if seq.req.max_tokens > 0:
                step.tokens = sample(row[-1:], [seq.req.sampling])
            events.append((seq, step))
        return events

    def _decode(self) -> list[tuple[Sequence, Step]]:
        logits = self.batch.decode([s.last for s in self._running])
        chosen = sample(logits, [s.req.sampling for s in self._running])
        return [(seq, Step([c])) for seq, c in zip(self._running, chosen, strict=True)]

    def _deliver(self, events: list[tuple[Sequence, Step]]) -> None:
        now = time.perf_counter()
        for seq, step in events:
            if step.tokens:
                seq.last = step.tokens[-1].token
                seq.stats.tokens += len(step.tokens)
                seq.stats.first_token = seq.stats.first_token or now
                if seq.last in self.eos:
                    step.finish_reason = "stop"
            if step.finish_reason is None and seq.stats.tokens >= seq.req.max_tokens:
                step.finish_reason = "length"
            if step.finish_reason is not None:
                seq.done = True
                seq.stats.finished = now
                if self.on_finish is not None:
                    self.on_finish(seq.stats)
            seq.queue.put_nowait(step)
        keep = [i for i, s in enumerate(self._running) if not (s.done or s.cancelled)]
        self.batch.keep(keep)
        self._running = [self._running[i] for i in keep]


def _coalesce(step: Step, queue: asyncio.Queue[Step | BaseException]) -> Step:
    """Merge steps already waiting into one: a consumer that fell behind (a busy proxy streaming many
    requests) then sends one chunk for several tokens instead of one per token."""
    while not queue.empty() and step.finish_reason is None:
        nxt = queue.get_nowait()
        if isinstance(nxt, BaseException):
            queue.put_nowait(nxt)  # raised on the next read, after what was generated is delivered
            break
        step = Step([*step.tokens, *nxt.tokens], step.prompt, nxt.finish_reason)
    return step


def _eos_ids(loaded: LoadedModel) -> set[int]:
    ids: set[int] = set()
    for value in (loaded.tokenizer.eos_token_id, getattr(loaded.model.generation_config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(int(v) for v in value)
    return ids
