"""Continuous batching: requests join the running batch between decoding steps and leave when done.

One asyncio task per model schedules: admit waiting requests (prefilled together, then merged into the
padded batch), run decode steps for every row (more per trip the fuller the batch), hand each row its
tokens, drop finished or cancelled rows, repeat. Forward passes run in a worker thread so the replica keeps
accepting requests and answering health checks meanwhile; the batch itself is only touched by that one task.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field

from llm.models.load import LoadedModel
from llm.models.stops import stop_token_ids
from llm.serve.batch import PaddedBatch
from llm.serve.protocol import ApiError
from llm.serve.sampling import Choice, Row, Sampling, prompt_logprobs, sample

log = logging.getLogger("ray.serve")

DECODE_STEPS = 2
"""Decode steps per trip to the worker thread while nobody waits to join the batch (the fewest)."""
MAX_DECODE_STEPS = 8
"""The most decode steps per trip (a full batch): tokens then reach each stream in chunks of up to 8."""
HOP_BUDGET_S = 0.05
"""A trip with more than the fewest steps stays under this, so a slow model still streams smoothly."""


@dataclass
class GenerateRequest:
    """What the engine needs: token ids in, a token budget, decoding settings."""

    prompt: list[int]
    max_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    echo_logprobs: bool = False
    """Also report the prompt tokens' logprobs (completions' `echo` with `logprobs`)."""
    stop_ids: frozenset[int] = frozenset()
    """Tokens that end this request besides the model's own end-of-text and end-of-turn (`stop_token_ids`)."""
    ignore_eos: bool = False
    """Keep going past the model's end-of-text and end-of-turn tokens (load tests want exact lengths)."""
    min_tokens: int = 0
    """Stop tokens are not possible before this many tokens."""


@dataclass
class Step:
    """One event of a stream: new tokens, the prompt's logprobs (first event, when asked), a finish."""

    tokens: list[Choice] = field(default_factory=list)
    prompt: list[Choice] | None = None
    finish_reason: str | None = None
    stop_token: int | None = None
    """The token that ended the request (`finish_reason` "stop" on a token, not a stop string)."""


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

    def __init__(self, req: GenerateRequest, stops: frozenset[int]) -> None:
        self.req = req
        self.queue: asyncio.Queue[Step | BaseException] = asyncio.Queue()
        self.stats = RequestStats(prompt_tokens=len(req.prompt))
        self.stops = (frozenset() if req.ignore_eos else stops) | req.stop_ids
        self.generated: list[int] = []
        self.last = -1
        self.done = False
        self.cancelled = False
        self._row = Row(req.sampling, req.prompt, self.generated, sorted(self.stops) if req.min_tokens > 0 else [])

    def row(self) -> Row:
        """What sampling this sequence's next token needs: one `Row` for the whole request (it reads
        `generated` as it grows), rebuilt once, when `min_tokens` is reached and the stop tokens are allowed."""
        if self._row.banned and len(self.generated) >= self.req.min_tokens:
            self._row = Row(self.req.sampling, self.req.prompt, self.generated)
        return self._row

    def cancel(self) -> None:
        """Leave the batch at the next step (client gone, stop string found)."""
        self.cancelled = True


class Engine:
    """Continuous-batching generation over one loaded model."""

    def __init__(self, loaded: LoadedModel, max_batch_size: int = 16,
                 on_finish: Callable[[RequestStats], None] | None = None, max_queued_tokens: int = 65_536) -> None:
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.max_batch_size = max_batch_size
        self.max_queued_tokens = max_queued_tokens
        self.on_finish = on_finish
        self.context = loaded.context
        self.batch = PaddedBatch(loaded.model)
        # The model's end-of-text and its chat template's end-of-turn: a chat answer ends where its turn does.
        self.eos = frozenset(stop_token_ids(loaded.tokenizer, getattr(loaded.model, "generation_config", None)))
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (min(self.eos) if self.eos else 0))
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._queued_tokens = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.last_step = time.monotonic()
        """When the loop last finished a forward pass (the health check reads it)."""
        self._step_s = 0.0
        """Seconds per decode step of the last trip (`_steps_per_trip` keeps a trip within its budget)."""

    @property
    def in_flight(self) -> int:
        return len(self._waiting) + len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    def reserve(self, tokens: int) -> None:
        """429 unless `tokens` more prompt tokens fit in this replica's queue (`serve.max_queued_tokens`)."""
        if self._queued_tokens + tokens > self.max_queued_tokens:
            raise ApiError(429, f"This replica has {self._queued_tokens} prompt tokens waiting; {tokens} more would "
                                f"pass its limit of {self.max_queued_tokens} (serve.max_queued_tokens). Retry later "
                                "or send fewer prompts per request.", "rate_limit_error", code="queue_full")

    def submit(self, req: GenerateRequest) -> Sequence:
        """Queue a request; it joins the running batch at the next step with a free row."""
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()  # bound to the running loop
            self._task = asyncio.get_running_loop().create_task(self._loop())
        seq = Sequence(req, self.eos)
        self._waiting.append(seq)
        self._queued_tokens += len(req.prompt)
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

    async def check(self, stall_s: float = 60.0) -> None:
        """Health, answered outside the request queue: the loop has not crashed and, when busy, has stepped
        within `stall_s`; when idle, a one-token forward pass (in a worker thread) works. Raises otherwise."""
        if self._task is not None and self._task.done() and not self._task.cancelled() and self._task.exception():
            raise RuntimeError(f"the engine's loop died: {self._task.exception()!r}")
        if self.in_flight:
            idle = time.monotonic() - self.last_step
            if idle > stall_s:
                raise RuntimeError(f"the engine has not finished a step in {idle:.0f} s with {self.in_flight} "
                                   "requests in flight")
            return
        await asyncio.to_thread(self.batch.probe, self.pad_id)

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
                    # Several steps per trip when nobody waits to join (vLLM's multi-step scheduling); a
                    # newcomer is admitted after one step.
                    steps = 1 if self._waiting else self._steps_per_trip()
                    self._deliver(await asyncio.to_thread(self._decode, steps))
            except Exception as e:  # the model failed: fail what is in flight, keep serving the rest
                log.exception("generation failed")
                for seq in [*self._running, *joining]:
                    seq.queue.put_nowait(e)
                self._running = []
                self.batch.keep([])
            self.last_step = time.monotonic()

    def _steps_per_trip(self) -> int:
        """Decode steps for the next trip to the worker thread. Every trip costs a thread hop and delivers one
        chunk per running sequence, which the proxy and each client must then carry: with one stream that
        is cheap, with a full batch it is what bounds the tokens/s a replica streams. So a batch of n takes
        n/2 steps per trip (2 to 8; one stream gets a chunk every 2 tokens, 16 streams every 8), kept within
        `HOP_BUDGET_S` by the last trip's step time."""
        steps = min(MAX_DECODE_STEPS, max(DECODE_STEPS, len(self._running) // 2))
        if self._step_s > 0:
            steps = min(steps, max(DECODE_STEPS, int(HOP_BUDGET_S / self._step_s)))
        return steps

    def _admit(self) -> list[Sequence]:
        joining: list[Sequence] = []
        while self._waiting and len(self._running) + len(joining) < self.max_batch_size:
            seq = self._waiting.popleft()
            self._queued_tokens -= len(seq.req.prompt)
            if not seq.cancelled:
                seq.stats.admitted = time.perf_counter()
                joining.append(seq)
        return joining

    def _prefill(self, joining: list[Sequence]) -> list[tuple[Sequence, Step | Exception]]:
        # Only an echo with logprobs needs every prompt position's logits; the rest need the last one.
        every = any(s.req.echo_logprobs for s in joining)
        logits = self.batch.prefill([s.req.prompt for s in joining], self.pad_id, every_position=every)
        self._running += joining
        chosen = sample(logits[:, -1], [s.row() for s in joining])
        events: list[tuple[Sequence, Step | Exception]] = []
        for seq, row, choice in zip(joining, logits, chosen, strict=True):
            if isinstance(choice, Exception):
                events.append((seq, choice))
                continue
            step = Step()
            if seq.req.echo_logprobs:
                real = row[row.shape[0] - len(seq.req.prompt):]
                step.prompt = prompt_logprobs(real, seq.req.prompt, seq.req.sampling.top_logprobs or 0)
            if seq.req.max_tokens > 0:
                step.tokens = [choice]
                seq.last = choice.token
                seq.generated.append(choice.token)
            events.append((seq, step))
        return events

    def _decode(self, steps: int = 1) -> list[tuple[Sequence, Step | Exception]]:
        """`steps` decode steps for every row; a row that finishes (or fails) at one keeps its batch row until
        `_deliver` drops it, and the tokens it gets after finishing are discarded."""
        if all(r.sampling.plain and not r.banned for r in (s.row() for s in self._running)):
            return self._decode_greedy(steps)
        tokens: dict[int, list[Choice]] = {id(s): [] for s in self._running}
        failed: dict[int, Exception] = {}
        started, done = time.perf_counter(), 0
        for _ in range(steps):
            live = {id(s) for s in self._running if id(s) not in failed and not self._finished(s, tokens[id(s)])}
            if not live:
                break
            done += 1
            logits = self.batch.decode([s.last for s in self._running])
            chosen = sample(logits, [s.row() for s in self._running])
            for seq, c in zip(self._running, chosen, strict=True):
                if id(seq) not in live:
                    continue
                if isinstance(c, Exception):
                    failed[id(seq)] = c
                    continue
                seq.last = c.token
                seq.generated.append(c.token)
                tokens[id(seq)].append(c)
        if done:
            self._step_s = (time.perf_counter() - started) / done
        return [(seq, failed[id(seq)] if id(seq) in failed else Step(tokens[id(seq)])) for seq in self._running]

    def _decode_greedy(self, steps: int) -> list[tuple[Sequence, Step | Exception]]:
        """`_decode` for a batch whose every row is plain greedy (the batch's argmax is each row's token): the
        trip's steps run back to back with the tokens left on the model's device, and the rows' records are
        written once per trip. As in vLLM's multi-step scheduling, a row's end (a stop token) is found after
        the trip, its later tokens discarded; the trip is cut only to the longest budget left."""
        import torch

        running = self._running
        started = time.perf_counter()
        last = torch.tensor([s.last for s in running], dtype=torch.long, device=self.batch.device)
        picked = []
        for _ in range(min(steps, max(s.req.max_tokens - len(s.generated) for s in running))):
            last = self.batch.decode(last).argmax(-1)
            picked.append(last)
        if picked:
            self._step_s = (time.perf_counter() - started) / len(picked)
        events: list[tuple[Sequence, Step | Exception]] = []
        rows = torch.stack(picked, 1).tolist() if picked else [[] for _ in running]
        for seq, row in zip(running, rows, strict=True):
            new: list[Choice] = []
            for token in row:
                seq.last = token
                seq.generated.append(token)
                new.append(Choice(token))
                if self._finished(seq, new):
                    break
            events.append((seq, Step(new)))
        return events

    @staticmethod
    def _finished(seq: Sequence, new: list[Choice]) -> bool:
        return bool(new) and (new[-1].token in seq.stops or len(seq.generated) >= seq.req.max_tokens)

    def _deliver(self, events: list[tuple[Sequence, Step | Exception]]) -> None:
        now = time.perf_counter()
        for seq, step in events:
            if isinstance(step, Exception):  # this request alone failed (its settings, not the model)
                seq.done = True
                seq.queue.put_nowait(ApiError(400, f"generation failed for this request: {step}"))
                continue
            if step.tokens:
                seq.stats.tokens += len(step.tokens)
                seq.stats.first_token = seq.stats.first_token or now
                if seq.last in seq.stops:
                    step.finish_reason, step.stop_token = "stop", seq.last
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
