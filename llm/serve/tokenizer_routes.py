"""`/tokenize`, `/detokenize` and `/tokenizer_info` in vLLM's shapes, so lm-evaluation-harness finds them and
scores with the server's own tokenizer (`tokenizer_backend=remote`, chosen by itself)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request

from llm.serve.engine import Engine
from llm.serve.http import read_body
from llm.serve.protocol import ApiError, ChatRequest, DetokenizeRequest, TokenizeRequest, parse_body
from llm.serve.service import Service


def add_tokenizer_routes(app: FastAPI, service: Service, limit: int) -> None:
    """`/tokenize`, `/detokenize`, `/tokenizer_info` in vLLM's shapes: lm-evaluation-harness finds them and
    uses the server's own tokenizer."""

    def engine_for(name: str | None) -> Engine:
        return service.engine(name) if name else next(iter(service.engines.values()))

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        service.authorize(request.headers.get("authorization"))
        req = parse_body(await read_body(request, limit), TokenizeRequest)
        engine = engine_for(req.model)
        if req.messages is not None:
            chat = ChatRequest.model_construct(model=req.model or "", messages=req.messages,
                                               add_generation_prompt=req.add_generation_prompt, tools=None,
                                               continue_final_message=False)
            ids = service.chat_ids(engine, chat)
        else:
            ids = list(engine.tokenizer(req.prompt, add_special_tokens=bool(req.add_special_tokens))["input_ids"])
        strs = engine.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return {"count": len(ids), "max_model_len": engine.context, "tokens": ids, "token_strs": strs}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        service.authorize(request.headers.get("authorization"))
        req = parse_body(await read_body(request, limit), DetokenizeRequest)
        engine = engine_for(req.model)
        vocab = engine.loaded.model.config.vocab_size
        if any(t >= vocab for t in req.tokens):
            raise ApiError(400, f"tokens: token ids must be < {vocab}", param="tokens")
        return {"prompt": engine.tokenizer.decode(req.tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_info(request: Request, model: str | None = None) -> dict[str, Any]:
        service.authorize(request.headers.get("authorization"))
        tok = engine_for(model).tokenizer
        return {"tokenizer_class": type(tok).__name__, "eos_token": tok.eos_token, "bos_token": tok.bos_token,
                "pad_token": tok.pad_token, "unk_token": tok.unk_token, "chat_template": tok.chat_template,
                "model_max_length": engine_for(model).context,
                "added_tokens_decoder": {str(i): str(t) for i, t in tok.added_tokens_decoder.items()}}
