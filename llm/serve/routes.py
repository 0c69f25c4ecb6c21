"""The OpenAI-compatible FastAPI app: `/v1/models`, `/v1/completions`, `/v1/chat/completions`, vLLM's
`/tokenize`, `/detokenize` and `/tokenizer_info`, Prometheus `/metrics`, and `/health`.

Built by `create_app(service)` so the very same app runs inside a Serve replica and in-process (tests,
the benchmark's baseline). Every error is OpenAI's error JSON; a request is validated completely
before anything is generated.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from llm.serve.engine import Engine, GenerateRequest
from llm.serve.http import host_allowed, read_body
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
from llm.serve.text import Piece, TextOptions, run_choice
from llm.serve.tokenizer_routes import add_tokenizer_routes

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


def add_error_handlers(app: FastAPI) -> None:
    """Every failure as OpenAI's error JSON: ours with their status, FastAPI's and Starlette's as 4xx, anything
    else a logged 500."""
    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers={"Retry-After": "1"} if e.status == 429 else None)

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


def create_app(service: Service) -> FastAPI:
    """The FastAPI app over a `Service`."""
    app = FastAPI(title="llmray", description="OpenAI-compatible completions and chat", docs_url=None,
                  redoc_url=None, openapi_url=None)
    limit = service.cfg.max_body_bytes

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Any:
        if not host_allowed(service.cfg.host, request.headers.get("host")):
            response: Any = _error(403, f"Host {request.headers.get('host')!r} is not served here")
        else:
            response = await call_next(request)
        route = request.scope.get("route")
        service.metrics.requests.labels(getattr(route, "path", "other"), str(response.status_code)).inc()
        return response

    add_error_handlers(app)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/openapi.json")
    async def openapi(request: Request) -> dict[str, Any]:
        service.authorize(request.headers.get("authorization"))
        return app.openapi()

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        service.authorize(request.headers.get("authorization"))
        body, kind = service.metrics.render()
        return Response(body, media_type=kind)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        service.authorize(request.headers.get("authorization"))
        return {"object": "list", "data": [_model_card(name, e) for name, e in service.engines.items()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str, request: Request) -> dict[str, Any]:
        service.authorize(request.headers.get("authorization"))
        return _model_card(model, service.engine(model))

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> JSONResponse | StreamingResponse:
        service.authorize(request.headers.get("authorization"))
        req = parse_body(await read_body(request, limit), CompletionRequest)
        return await _completions(service, req)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(request: Request) -> JSONResponse | StreamingResponse:
        service.authorize(request.headers.get("authorization"))
        req = parse_body(await read_body(request, limit), ChatRequest)
        return await _chat(service, req)

    add_tokenizer_routes(app, service, limit)
    return app


def _model_card(name: str, engine: Engine) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "llmray", "root": name, "parent": None,
            "max_model_len": engine.context}


def _text_options(req: CompletionRequest | ChatRequest) -> TextOptions:
    return TextOptions(req.stop_list(), bool(req.include_stop_str_in_output), req.skip_special_tokens is not False)


def _usage_extra(req: CompletionRequest | ChatRequest, prompt: int, completion: int) -> dict[str, Any]:
    return {"usage": usage(prompt, completion)} if req.continuous_usage() else {}


@dataclass
class _Choices:
    """What a completions request's choices share: engine requests, echoed texts, logprob books."""

    gens: list[GenerateRequest]
    texts: list[str]
    books: list[CompletionLogprobs]
    top: int | None

    def logprobs_of(self, piece: Piece) -> dict[str, Any] | None:
        if self.top is None:
            return None
        head = None
        if piece.prompt is not None:  # echo: the prompt's tokens first; the very first has no logprob
            first = Choice(self.gens[piece.index].prompt[0])
            head = self.books[piece.index].block([first, *piece.prompt], first_is_unscored=True)
        return merge_logprobs(head, self.books[piece.index].block(piece.tokens))


async def _completions(service: Service, req: CompletionRequest) -> JSONResponse | StreamingResponse:
    engine = service.engine(req.model)
    prompts = [service.prompt_ids(engine, p) for p in req.prompts()]
    per = req.candidates()
    echo = bool(req.echo) and req.logprobs is not None
    gens = [service.generate_request(engine, req, ids, service.budget(engine, len(ids), req.max_tokens,
                                                                       COMPLETION_DEFAULT_MAX_TOKENS),
                                      j, req.logprobs, echo=echo)
            for ids in prompts for j in range(per)]
    service.admit(engine, gens)
    prompt_texts = [engine.tokenizer.decode(ids) for ids in prompts]
    token_text = TokenText(engine.tokenizer)
    # Choice i is prompt i // per; OpenAI's text_offset counts from the start of the prompt, echoed or not.
    choices = _Choices(gens, [prompt_texts[i // per] if req.echo else "" for i in range(len(gens))],
                       [CompletionLogprobs(token_text, 0 if req.echo else len(prompt_texts[i // per]))
                        for i in range(len(gens))], req.logprobs)
    opts = _text_options(req)
    stream = within(merged([run_choice(engine, i, g, opts) for i, g in enumerate(gens)]),
                    service.cfg.request_timeout_s)
    prompt_total = sum(len(p) for p in prompts)
    if req.stream:
        return StreamingResponse(sse_stream(_completion_chunks(req, stream, choices, prompt_total)),
                                 media_type="text/event-stream")
    return JSONResponse(await _whole_completion(req, stream, choices, prompt_total))


async def _completion_chunks(req: CompletionRequest, stream: AsyncIterator[Piece], choices: _Choices,
                             prompt_total: int) -> AsyncIterator[dict[str, Any]]:
    rid, sent_echo, done = new_id("cmpl"), set(), [0] * len(choices.gens)
    async for piece in stream:
        if not (piece.text or piece.finish_reason or piece.index not in sent_echo or choices.top is not None):
            continue  # text held back (partial character, possible stop string): nothing to send
        text = piece.text
        if piece.index not in sent_echo:
            sent_echo.add(piece.index)
            text = choices.texts[piece.index] + text
        done[piece.index] = piece.completion_tokens
        choice = {"index": piece.index, "text": text, "logprobs": choices.logprobs_of(piece),
                  "finish_reason": piece.finish_reason}
        yield envelope("text_completion", rid, req.model, [choice], **_usage_extra(req, prompt_total, sum(done)))
    if req.include_usage():
        yield envelope("text_completion", rid, req.model, [], usage=usage(prompt_total, sum(done)))


async def _whole_completion(req: CompletionRequest, stream: AsyncIterator[Piece], choices: _Choices,
                            prompt_total: int) -> dict[str, Any]:
    out: list[dict[str, Any]] = [{"index": i, "text": choices.texts[i], "logprobs": None, "finish_reason": None}
                                 for i in range(len(choices.gens))]
    score = [0.0] * len(out)
    completion_total = 0
    async for piece in stream:
        choice = out[piece.index]
        choice["text"] += piece.text
        score[piece.index] += sum(c.logprob or 0.0 for c in piece.tokens)
        if choices.top is not None:
            choice["logprobs"] = merge_logprobs(choice["logprobs"], choices.logprobs_of(piece) or {})
        if piece.finish_reason is not None:
            choice["finish_reason"] = piece.finish_reason
            completion_total += piece.completion_tokens
    per, keep = req.candidates(), req.choices()
    if per > keep:  # best_of: the `n` candidates of each prompt with the highest total logprob
        out = [c for p in range(len(out) // per)
               for c in sorted(out[p * per:(p + 1) * per], key=lambda c: -score[c["index"]])[:keep]]
        for i, c in enumerate(out):
            c["index"] = i
    return envelope("text_completion", new_id("cmpl"), req.model, out, usage=usage(prompt_total, completion_total))


async def _chat(service: Service, req: ChatRequest) -> JSONResponse | StreamingResponse:
    engine = service.engine(req.model)
    gens = service.chat_requests(engine, req)
    rid, token_text = new_id("chatcmpl"), TokenText(engine.tokenizer)
    opts = _text_options(req)
    stream = within(merged([run_choice(engine, i, g, opts) for i, g in enumerate(gens)]),
                    service.cfg.request_timeout_s)
    prompt_tokens = len(gens[0].prompt) if gens else 0

    def logprobs_of(piece: Piece) -> dict[str, Any] | None:
        return chat_logprobs(token_text, piece.tokens) if req.logprobs else None

    if req.stream:
        async def chunks() -> AsyncIterator[dict[str, Any]]:
            done = [0] * len(gens)
            for i in range(len(gens)):
                first = {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None}
                yield envelope("chat.completion.chunk", rid, req.model, [first], **_usage_extra(req, prompt_tokens, 0))
            async for piece in stream:
                if not (piece.text or piece.finish_reason or req.logprobs):
                    continue  # text held back (partial character, possible stop string): nothing to send
                delta = {"content": piece.text} if piece.text else {}
                choice = {"index": piece.index, "delta": delta, "logprobs": logprobs_of(piece),
                          "finish_reason": piece.finish_reason}
                done[piece.index] = piece.completion_tokens
                yield envelope("chat.completion.chunk", rid, req.model, [choice],
                               **_usage_extra(req, prompt_tokens, sum(done)))
            if req.include_usage():
                yield envelope("chat.completion.chunk", rid, req.model, [], usage=usage(prompt_tokens, sum(done)))

        return StreamingResponse(sse_stream(chunks()), media_type="text/event-stream")

    started = time.perf_counter()
    texts, counts = [""] * len(gens), [0] * len(gens)
    finishes: list[str | None] = [None] * len(gens)
    content_lp: list[list[Any]] = [[] for _ in gens]
    async for piece in stream:
        texts[piece.index] += piece.text
        if piece.finish_reason is not None:
            finishes[piece.index], counts[piece.index] = piece.finish_reason, piece.completion_tokens
        content_lp[piece.index] += (logprobs_of(piece) or {"content": []})["content"]
    choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]},
                "logprobs": {"content": content_lp[i]} if req.logprobs else None, "finish_reason": finishes[i]}
               for i in range(len(gens))]
    log.debug("chat %s: %d tokens in %.3fs", rid, sum(counts), time.perf_counter() - started)
    return JSONResponse(envelope("chat.completion", rid, req.model, choices,
                                 usage=usage(prompt_tokens, sum(counts))))
