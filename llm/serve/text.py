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
    """Decoded text of a growing token list, released in safe increments, cut at the first stop string.

    Decoding is incremental (vLLM's prefix/read offsets): each token decodes a few ids, never the whole
    answer, and stop strings are searched only where new text could complete them.
    """

    def __init__(self, tokenizer: Any, stops: list[str], include_stop: bool = False,
                 skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.stops = stops
        self.include_stop = include_stop
        self.skip_special = skip_special_tokens
        self.longest = max((len(s) for s in stops), default=0)
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] decode to text already in `self.text`
        self.read = 0
        self.sent = 0
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=self.skip_special))

    def _grow(self) -> int:
        """Decode what the new ids add; returns where the new text starts. A trailing partial UTF-8
        character (U+FFFD) waits for its next byte."""
        start = len(self.text)
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
        return start

    def add(self, tokens: list[int]) -> tuple[str, bool]:
        """Append tokens; returns (text safe to send now, whether a stop string ended the text)."""
        self.ids += tokens
        start = self._grow()
        if self.stops:
            search = max(0, start - self.longest + 1)
            hits = [(i, len(s)) for s in self.stops if (i := self.text.find(s, search)) >= 0]
            if hits:
                at, length = min(hits)
                self.text = self.text[:at + length] if self.include_stop else self.text[:at]
                return self._release(len(self.text)), True
        return self._release(max(len(self.text) - self._held(), self.sent)), False

    def _held(self) -> int:
        """Characters at the end that could still grow into a stop string (only where a stop's first
        character occurs in the last `longest - 1` characters)."""
        n, hold = len(self.text), 0
        for stop in self.stops:
            i = self.text.find(stop[0], max(self.sent, n - len(stop) + 1))
            while i != -1:
                if stop.startswith(self.text[i:]):
                    hold = max(hold, n - i)
                    break
                i = self.text.find(stop[0], i + 1)
        return hold

    def flush(self) -> str:
        """Everything not sent yet (the request finished: nothing can change any more)."""
        rest = self._decode(self.ids[self.prefix:])
        before = self._decode(self.ids[self.prefix:self.read])
        if len(rest) > len(before):
            self.text += rest[len(before):]
            self.prefix = self.read = len(self.ids)
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


@dataclass
class TextOptions:
    """How a choice's tokens become text: stop strings and whether stops and special tokens show."""

    stops: list[str] = field(default_factory=list)
    include_stop: bool = False
    skip_special_tokens: bool = True


async def run_choice(engine: Engine, index: int, req: GenerateRequest, opts: TextOptions) -> AsyncIterator[Piece]:
    """Generate one choice as text pieces; the last piece carries `finish_reason` (and the stop token or
    string that ended it, vLLM's `stop_reason`)."""
    detok = TextStream(engine.tokenizer, opts.stops, opts.include_stop, opts.skip_special_tokens)
    count = 0
    async with aclosing(engine.generate(req)) as steps:  # closing frees the batch row at once
        async for step in steps:
            count += len(step.tokens)
            ids = [c.token for c in step.tokens]
            if step.stop_token is not None and not opts.include_stop and ids and ids[-1] == step.stop_token:
                ids = ids[:-1]  # the stop token is counted, not shown (unless include_stop_str_in_output)
            text, stopped = detok.add(ids)
            finish = "stop" if stopped else step.finish_reason
            if finish is not None and not stopped:
                text += detok.flush()
            yield Piece(index, text, step.tokens, step.prompt, finish, count)
            if finish is not None:
                return
