"""What one replica serves: its models (each with its own engine), the request limits and the API key.

Everything that can reject a request does so here, before the engine sees it, so a bad request is
always a 4xx and never reaches a forward pass.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from typing import Any

from llm.config import ServeConfig
from llm.serve.engine import Engine, GenerateRequest
from llm.serve.protocol import ApiError, ChatRequest, Message
from llm.serve.sampling import Sampling

log = logging.getLogger("ray.serve")

# Used when a model's tokenizer has none (a pretrained-only model): ChatML, the most widely known.
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def key_digest(key: str) -> str:
    """SHA-256 of an API key: replicas keep only this, never the key itself."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class Service:
    """Models by name, limits and auth of one replica."""

    def __init__(self, engines: dict[str, Engine], cfg: ServeConfig, key_sha256: str | None = None) -> None:
        self.engines = engines
        self.cfg = cfg
        self.key_sha256 = key_sha256

    def authorize(self, header: str | None) -> None:
        """401 unless `Authorization: Bearer <key>` matches (when a key is configured)."""
        if self.key_sha256 is None:
            return
        scheme, _, token = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key_digest(token.strip()), self.key_sha256):
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")

    def engine(self, model: str) -> Engine:
        """The engine serving `model`; 404 as OpenAI answers an unknown model."""
        if model not in self.engines:
            raise ApiError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")
        return self.engines[model]

    def prompt_ids(self, engine: Engine, prompt: str | list[int]) -> list[int]:
        """Token ids of a text or id prompt; ids outside the vocabulary are a 400."""
        if isinstance(prompt, str):
            return list(engine.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        vocab = engine.loaded.model.config.vocab_size
        if any(t >= vocab for t in prompt):
            raise ApiError(400, f"prompt: token ids must be < {vocab}", param="prompt")
        return prompt

    def chat_ids(self, engine: Engine, messages: list[Message]) -> list[int]:
        """The conversation rendered with the model's chat template (ChatML when it has none)."""
        tok = engine.tokenizer
        rendered = [{"role": m.role, "content": m.text()} for m in messages]
        try:
            text = tok.apply_chat_template(rendered, tokenize=False, add_generation_prompt=True,
                                           chat_template=None if tok.chat_template else DEFAULT_CHAT_TEMPLATE)
        except Exception as e:  # a template may refuse a conversation (e.g. roles must alternate)
            raise ApiError(400, f"messages: the chat template refused them: {e}", param="messages") from None
        return list(tok(text, add_special_tokens=False)["input_ids"])

    def budget(self, engine: Engine, prompt_len: int, asked: int | None, default: int) -> int:
        """Tokens to generate: asked (bounded by `serve.max_tokens` and the context) or the default that
        fits; 400 with the limit when the prompt or the request does not fit (OpenAI's wording)."""
        limit = self.cfg.max_tokens
        if asked is not None and asked > limit:
            raise ApiError(400, f"max_tokens is too large: {asked}. This server allows at most {limit}.",
                           param="max_tokens")
        room = engine.context - prompt_len
        wanted = asked if asked is not None else min(default, limit, room) if room > 0 else default
        if prompt_len == 0:
            raise ApiError(400, "prompt: must contain at least one token", param="prompt")
        if prompt_len + wanted > engine.context or room <= 0:
            raise ApiError(400, f"This model's maximum context length is {engine.context} tokens. However, you "
                                f"requested {prompt_len + wanted} tokens ({prompt_len} in the messages, {wanted} "
                                "in the completion). Please reduce the length of the messages or completion.",
                           param="messages", code="context_length_exceeded")
        return wanted

    def sampling(self, temperature: float, top_p: float, seed: int | None, top: int | None) -> Sampling:
        """Decoding settings of one choice."""
        return Sampling(temperature=temperature, top_p=top_p, seed=seed, top_logprobs=top)

    def chat_request(self, engine: Engine, req: ChatRequest) -> GenerateRequest:
        """A chat request as the engine's request."""
        ids = self.chat_ids(engine, req.messages)
        top = (req.top_logprobs or 0) if req.logprobs else None
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        budget = self.budget(engine, len(ids), req.token_budget(), default=self.cfg.max_tokens)
        return GenerateRequest(ids, budget, self.sampling(req.temperature, req.top_p, req.seed, top))

    async def check(self, timeout_s: float = 30.0) -> None:
        """Health: every model generates one token within `timeout_s`; raises otherwise."""
        for name, engine in self.engines.items():
            req = GenerateRequest([engine.pad_id], 1, Sampling(temperature=0))

            async def one(e: Engine = engine, r: GenerateRequest = req) -> Any:
                return [step async for step in e.generate(r)]

            steps = await asyncio.wait_for(one(), timeout_s)
            if not steps or not steps[-1].tokens:
                raise RuntimeError(f"model {name} generated nothing")
