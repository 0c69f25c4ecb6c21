"""OpenAI response bodies: completions and chat, whole or as server-sent-event chunks, with logprobs."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from llm.serve.protocol import ApiError
from llm.serve.sampling import Choice


def new_id(prefix: str) -> str:
    """`cmpl-…` / `chatcmpl-…` ids."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """The `usage` object."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def envelope(kind: str, rid: str, model: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """The fields every completion body and chunk shares."""
    return {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": choices, **extra}


class TokenText:
    """Token ids to the strings logprobs report (cached: the same ids recur in every request)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, token: int) -> str:
        if token not in self.cache:
            self.cache[token] = self.tokenizer.decode([token])
        return self.cache[token]


class CompletionLogprobs:
    """Completions' `logprobs` object (tokens, token_logprobs, top_logprobs, text_offset), grown piecewise."""

    def __init__(self, text: TokenText, offset: int = 0) -> None:
        self.text = text
        self.offset = offset

    def block(self, choices: list[Choice], first_is_unscored: bool = False) -> dict[str, Any]:
        """The logprobs of these tokens; the first token of an echoed prompt has none (nothing precedes it)."""
        out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for i, c in enumerate(choices):
            token = self.text(c.token)
            unscored = first_is_unscored and i == 0
            out["tokens"].append(token)
            out["token_logprobs"].append(None if unscored else c.logprob)
            out["top_logprobs"].append(None if unscored else {self.text(t): lp for t, lp in c.top})
            out["text_offset"].append(self.offset)
            self.offset += len(token)
        return out


def merge_logprobs(a: dict[str, Any] | None, b: dict[str, Any]) -> dict[str, Any]:
    """Concatenate two completions logprobs blocks."""
    return b if a is None else {k: a[k] + b[k] for k in a}


def chat_logprobs(text: TokenText, choices: list[Choice]) -> dict[str, Any]:
    """Chat's `logprobs` object: `{"content": [{token, logprob, bytes, top_logprobs}]}`."""

    def entry(token: int, logprob: float | None) -> dict[str, Any]:
        s = text(token)
        return {"token": s, "logprob": logprob, "bytes": list(s.encode("utf-8"))}

    return {"content": [{**entry(c.token, c.logprob), "top_logprobs": [entry(t, lp) for t, lp in c.top]}
                        for c in choices]}


def sse(data: dict[str, Any]) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def sse_stream(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
    """Events of the chunks, then `data: [DONE]`. A failure mid-stream (the status is already sent)
    becomes an error event, as OpenAI does."""
    try:
        async for chunk in chunks:
            yield sse(chunk)
    except ApiError as e:  # e.g. the request's deadline passed mid-stream
        yield sse(e.body())
    except Exception as e:  # the client must learn the stream is broken
        yield sse({"error": {"message": f"generation failed: {type(e).__name__}", "type": "server_error",
                             "param": None, "code": None}})
    yield "data: [DONE]\n\n"
