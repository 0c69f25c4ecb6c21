"""Tokens to text while streaming: incremental detokenization and stop strings.

Text is only sent once it can no longer change: a trailing partial UTF-8 character (decoded as U+FFFD)
waits for its next byte, and a tail that could still grow into a stop string waits until it cannot.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from llm.serve.engine import Engine, GenerateRequest
from llm.serve.sampling import Choice


class TextStream:
    """Decoded text of a growing token list, released in safe increments, cut at the first stop string."""

    def __init__(self, tokenizer: Any, stops: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stops = stops
        self.ids: list[int] = []
        self.sent = 0
        self.text = ""

    def add(self, tokens: list[int]) -> tuple[str, bool]:
        """Append tokens; returns (text safe to send now, whether a stop string ended the text)."""
        self.ids += tokens
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        start = max(0, self.sent - max((len(s) for s in self.stops), default=0))
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            end = min(hits)
            self.text = self.text[:end]
            return self._release(end), True
        safe = len(self.text.rstrip("\ufffd"))
        hold = 0
        for stop in self.stops:  # hold back a tail that is the start of a stop string
            for k in range(min(len(stop) - 1, safe), 0, -1):
                if self.text[safe - k:safe] == stop[:k]:
                    hold = max(hold, k)
                    break
        safe -= hold
        return self._release(max(safe, self.sent)), False

    def flush(self) -> str:
        """Everything not sent yet (the request finished: nothing can change any more)."""
        return self._release(len(self.text))

    def _release(self, end: int) -> str:
        out = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return out


@dataclass
class Piece:
    """One streamed increment of one choice."""

    index: int
    text: str
    tokens: list[Choice] = field(default_factory=list)
    prompt: list[Choice] | None = None
    finish_reason: str | None = None
    completion_tokens: int = 0


async def run_choice(engine: Engine, index: int, req: GenerateRequest, stops: list[str]) -> AsyncIterator[Piece]:
    """Generate one choice as text pieces; the last piece carries `finish_reason`."""
    detok = TextStream(engine.tokenizer, stops)
    count = 0
    async with aclosing(engine.generate(req)) as steps:  # closing frees the batch row at once
        async for step in steps:
            count += len(step.tokens)
            text, stopped = detok.add([c.token for c in step.tokens])
            finish = "stop" if stopped else step.finish_reason
            if finish is not None and not stopped:
                text += detok.flush()
            yield Piece(index, text, step.tokens, step.prompt, finish, count)
            if finish is not None:
                return
