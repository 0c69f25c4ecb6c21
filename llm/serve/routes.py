"""The OpenAI-compatible FastAPI app: `/v1/models`, `/v1/completions`, `/v1/chat/completions`, `/health`.

Built by `create_app(service)` so the very same app runs inside a Serve replica and in-process (tests,
the benchmark's baseline). Every error is OpenAI's error JSON; a request is validated completely
before anything is generated.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from llm.serve.engine import GenerateRequest
from llm.serve.protocol import ApiError, ChatRequest, CompletionRequest, parse_body
from llm.serve.responses import (
    CompletionLogprobs,
    TokenText,
    chat_logprobs,
    envelope,
    merge_logprobs,
    new_id,
    sse_stream,
    usage,
)
from llm.serve.sampling import Choice
from llm.serve.service import COMPLETION_DEFAULT_MAX_TOKENS, Service
from llm.serve.text import Piece, run_choice

log = logging.getLogger("ray.serve")


async def merged(streams: list[AsyncIterator[Piece]]) -> AsyncIterator[Piece]:
    """Pieces of several choices as they come (one choice: the stream itself)."""
    if len(streams) == 1:
        async for piece in streams[0]:
            yield piece
        return
    queue: asyncio.Queue[Piece | BaseException | None] = asyncio.Queue()

    async def pump(stream: AsyncIterator[Piece]) -> None:
        try:
            async for piece in stream:
                queue.put_nowait(piece)
        except Exception as e:  # re-raised in the consumer
            queue.put_nowait(e)
        queue.put_nowait(None)

    tasks = [asyncio.ensure_future(pump(s)) for s in streams]
    try:
        left = len(tasks)
        while left:
            item = await queue.get()
            if item is None:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()


async def within(stream: AsyncIterator[Piece], seconds: float) -> AsyncIterator[Piece]:
    """`stream` until `seconds` have passed since the request started; then its generation is cancelled
    (it leaves the batch) and a 504 in OpenAI's error JSON is raised (an error event once streaming)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    it = stream.__aiter__()
    while True:
        try:
            piece = await asyncio.wait_for(it.__anext__(), max(deadline - loop.time(), 0.0))
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise ApiError(504, f"Request timed out after {seconds:g} s (serve.request_timeout_s); lower "
                                "max_tokens or retry later.", "timeout_error", code="timeout") from None
        yield piece


def _error(status: int, message: str, type_: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(ApiError(status, message, type_).body(), status_code=status)


def create_app(service: Service) -> FastAPI:
    """The FastAPI app over a `Service`."""
    app = FastAPI(title="llmray", description="OpenAI-compatible completions and chat", docs_url=None,
                  redoc_url=None)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        return _error(400, f"invalid request: {e.errors()[0].get('msg', 'bad value')}")

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException) -> JSONResponse:
        return _error(e.status_code, str(e.detail))

    @app.exception_handler(Exception)
    async def internal(_: Request, e: Exception) -> JSONResponse:
        log.exception("request failed")
        return _error(500, f"internal error: {type(e).__name__}", "server_error")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        service.authorize(request.headers.get("authorization"))
        return {"object": "list", "data": [_model_card(name) for name in service.engines]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str, request: Request) -> dict[str, Any]:
        service.authorize(request.headers.get("authorization"))
        service.engine(model)
        return _model_card(model)

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> JSONResponse | StreamingResponse:
        service.authorize(request.headers.get("authorization"))
        req = parse_body(await request.body(), CompletionRequest, service.cfg.max_body_bytes)
        return await _completions(service, req)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(request: Request) -> JSONResponse | StreamingResponse:
        service.authorize(request.headers.get("authorization"))
        req = parse_body(await request.body(), ChatRequest, service.cfg.max_body_bytes)
        return await _chat(service, req)

    return app


def _model_card(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "llmray"}


async def _completions(service: Service, req: CompletionRequest) -> JSONResponse | StreamingResponse:
    engine = service.engine(req.model)
    prompts = [service.prompt_ids(engine, p) for p in req.prompts()]
    top = req.logprobs
    gens = [GenerateRequest(ids, service.budget(engine, len(ids), req.max_tokens, COMPLETION_DEFAULT_MAX_TOKENS),
                            service.sampling(req.temperature, req.top_p, req.seed, top),
                            echo_logprobs=req.echo and top is not None) for ids in prompts]
    prompt_texts = [engine.tokenizer.decode(ids) for ids in prompts]
    texts = prompt_texts if req.echo else ["" for _ in prompts]
    token_text = TokenText(engine.tokenizer)
    # OpenAI's text_offset counts from the start of the prompt, echoed or not.
    books = [CompletionLogprobs(token_text, 0 if req.echo else len(t)) for t in prompt_texts]
    rid, stops = new_id("cmpl"), req.stop_list()
    stream = within(merged([run_choice(engine, i, g, stops) for i, g in enumerate(gens)]),
                    service.cfg.request_timeout_s)
    prompt_total = sum(len(p) for p in prompts)

    def logprobs_of(piece: Piece) -> dict[str, Any] | None:
        if top is None:
            return None
        head = None
        if piece.prompt is not None:  # echo: the prompt's tokens first; the very first has no logprob
            first = Choice(gens[piece.index].prompt[0])
            head = books[piece.index].block([first, *piece.prompt], first_is_unscored=True)
        return merge_logprobs(head, books[piece.index].block(piece.tokens))

    if req.stream:
        async def chunks() -> AsyncIterator[dict[str, Any]]:
            sent_echo: set[int] = set()
            completion_total = 0
            async for piece in stream:
                if not (piece.text or piece.finish_reason or piece.index not in sent_echo or top is not None):
                    continue  # text held back (partial character, possible stop string): nothing to send
                text = piece.text
                if piece.index not in sent_echo:
                    sent_echo.add(piece.index)
                    text = texts[piece.index] + text
                choice = {"index": piece.index, "text": text, "logprobs": logprobs_of(piece),
                          "finish_reason": piece.finish_reason}
                if piece.finish_reason is not None:
                    completion_total += piece.completion_tokens
                yield envelope("text_completion", rid, req.model, [choice])
            if req.include_usage():
                yield envelope("text_completion", rid, req.model, [], usage=usage(prompt_total, completion_total))

        return StreamingResponse(sse_stream(chunks()), media_type="text/event-stream")

    out: list[dict[str, Any]] = [{"index": i, "text": texts[i], "logprobs": None, "finish_reason": None}
                                 for i in range(len(gens))]
    completion_total = 0
    async for piece in stream:
        choice = out[piece.index]
        choice["text"] += piece.text
        if top is not None:
            choice["logprobs"] = merge_logprobs(choice["logprobs"], logprobs_of(piece) or {})
        if piece.finish_reason is not None:
            choice["finish_reason"] = piece.finish_reason
            completion_total += piece.completion_tokens
    return JSONResponse(envelope("text_completion", rid, req.model, out, usage=usage(prompt_total, completion_total)))


async def _chat(service: Service, req: ChatRequest) -> JSONResponse | StreamingResponse:
    engine = service.engine(req.model)
    gen = service.chat_request(engine, req)
    rid, token_text = new_id("chatcmpl"), TokenText(engine.tokenizer)
    stream = within(run_choice(engine, 0, gen, req.stop_list()), service.cfg.request_timeout_s)
    prompt_tokens = len(gen.prompt)

    def logprobs_of(piece: Piece) -> dict[str, Any] | None:
        return chat_logprobs(token_text, piece.tokens) if req.logprobs else None

    if req.stream:
        async def chunks() -> AsyncIterator[dict[str, Any]]:
            first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                     "finish_reason": None}
            yield envelope("chat.completion.chunk", rid, req.model, [first])
            completion = 0
            async for piece in stream:
                if not (piece.text or piece.finish_reason or req.logprobs):
                    continue  # text held back (partial character, possible stop string): nothing to send
                delta = {"content": piece.text} if piece.text else {}
                choice = {"index": 0, "delta": delta, "logprobs": logprobs_of(piece),
                          "finish_reason": piece.finish_reason}
                completion = piece.completion_tokens
                yield envelope("chat.completion.chunk", rid, req.model, [choice])
            if req.include_usage():
                yield envelope("chat.completion.chunk", rid, req.model, [], usage=usage(prompt_tokens, completion))

        return StreamingResponse(sse_stream(chunks()), media_type="text/event-stream")

    started = time.perf_counter()
    text, finish, completion, content_lp = "", None, 0, []
    async for piece in stream:
        text += piece.text
        finish, completion = piece.finish_reason, piece.completion_tokens
        content_lp += (logprobs_of(piece) or {"content": []})["content"]
    message = {"role": "assistant", "content": text}
    choice = {"index": 0, "message": message, "logprobs": {"content": content_lp} if req.logprobs else None,
              "finish_reason": finish}
    log.debug("chat %s: %d tokens in %.3fs", rid, completion, time.perf_counter() - started)
    return JSONResponse(envelope("chat.completion", rid, req.model, [choice],
                                 usage=usage(prompt_tokens, completion)))
