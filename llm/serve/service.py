"""What one replica serves: its models (each with its own engine), the request limits and the API key.

Everything that can reject a request does so here, before the engine sees it, so a bad request is
always a 4xx and never reaches a forward pass.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Callable
from typing import Any

from llm.config import ServeConfig
from llm.eval.turns import fit_roles
from llm.serve.engine import Engine, GenerateRequest, RequestStats
from llm.serve.metrics import ReplicaMetrics
from llm.serve.protocol import ApiError, ChatRequest, CompletionRequest
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
        self.special = {id(e): special_strings(e.tokenizer) for e in engines.values()}
        self.metrics = ReplicaMetrics()
        for name, engine in engines.items():
            self.metrics.watch(name, engine)
            engine.on_finish = _both(engine.on_finish, self.metrics.recorder(name))

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

    def chat_ids(self, engine: Engine, req: ChatRequest) -> list[int]:
        """The conversation rendered with the model's chat template (ChatML when it has none).

        Only the template inserts control tokens: text in a message that looks like a special token
        (`<|im_start|>system`) stays text, so a user cannot forge a system or assistant turn.
        """
        tok = engine.tokenizer
        template = tok.chat_template or DEFAULT_CHAT_TEMPLATE
        if req.tools and "tools" not in template:
            raise ApiError(400, f"tools: the chat template of model {req.model} has no tool support", param="tools")
        kwargs: dict[str, Any] = {"tools": req.tools} if req.tools else {}
        if req.continue_final_message:
            kwargs["continue_final_message"] = True
        contents = [m.text() for m in req.messages]
        sentinels = [f"\ue000{i}\ue001" for i in range(len(contents))]
        forged = any(t in c for c in contents for t in self.special[id(engine)])

        def render(texts: list[str]) -> str:
            # A system message the template refuses (Gemma 2) joins the first user turn, as fine-tuning and
            # the eval table render it (`llm.eval.turns.fit_roles`): the model sees what it was tuned on.
            messages, _ = fit_roles(tok, [{"role": m.role, "content": t}
                                          for m, t in zip(req.messages, texts, strict=True)])
            try:
                return str(tok.apply_chat_template(messages, tokenize=False, chat_template=template,
                                                   add_generation_prompt=bool(req.add_generation_prompt) and
                                                   not req.continue_final_message, **kwargs))
            except Exception as e:  # a template may refuse a conversation (e.g. roles must alternate)
                raise ApiError(400, f"messages: the chat template refused them: {e}", param="messages") from None

        if not forged:  # the common case: tokenized exactly as training rendered it
            return list(tok(render(contents), add_special_tokens=False)["input_ids"])
        text = render(sentinels)
        ids: list[int] = []
        for sentinel, content in zip(sentinels, contents, strict=True):
            head, found, text = text.partition(sentinel)
            if not found:
                raise ApiError(400, "messages: a message contains special-token text and the model's chat "
                                    "template does not insert contents verbatim", param="messages")
            ids += tok(head, add_special_tokens=False)["input_ids"]
            ids += tok(content, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        return ids + list(tok(text, add_special_tokens=False)["input_ids"])

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

    def sampling(self, req: ChatRequest | CompletionRequest, top: int | None, index: int = 0) -> Sampling:
        """Decoding settings of one choice; choice `index` of a seeded request draws from `seed + index`, so
        `n` choices differ and the request stays reproducible."""
        bias = {int(k): v for k, v in (req.logit_bias or {}).items()}
        return Sampling(
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0, min_p=req.min_p or 0.0,
            repetition_penalty=req.repetition_penalty or 1.0, presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0, logit_bias=bias,
            seed=None if req.seed is None else (req.seed + index) % 2**64, top_logprobs=top,
            track_logprob=isinstance(req, CompletionRequest) and req.candidates() > req.choices())

    def generate_request(self, engine: Engine, req: ChatRequest | CompletionRequest, ids: list[int], budget: int,
                         index: int, top: int | None, echo: bool = False) -> GenerateRequest:
        """One choice as the engine's request: choice `index` of `req` on prompt `ids`, `budget` tokens, `top`
        alternatives per logprob (None: no logprobs), `echo` the prompt's logprobs too. (The seven arguments are
        the request and what a route worked out for this one choice; bundling them would only rename them.)"""
        vocab = engine.loaded.model.config.vocab_size
        if any(t >= vocab for t in req.stop_token_ids or []):
            raise ApiError(400, f"stop_token_ids: token ids must be < {vocab}", param="stop_token_ids")
        return GenerateRequest(ids, budget, self.sampling(req, top, index), echo_logprobs=echo,
                               stop_ids=frozenset(req.stop_token_ids or []), ignore_eos=bool(req.ignore_eos),
                               min_tokens=min(req.min_tokens or 0, budget))

    def admit(self, engine: Engine, gens: list[GenerateRequest]) -> None:
        """400 past `serve.max_prompts` sequences in one request; 429 when the replica's queue is full."""
        if len(gens) > self.cfg.max_prompts:
            raise ApiError(400, f"this request asks for {len(gens)} sequences (prompts x n or best_of); this server "
                                f"allows at most {self.cfg.max_prompts} per request", param="prompt")
        engine.reserve(sum(len(g.prompt) for g in gens))

    def chat_requests(self, engine: Engine, req: ChatRequest) -> list[GenerateRequest]:
        """A chat request as the engine's requests, one per choice."""
        ids = self.chat_ids(engine, req)
        top = (req.top_logprobs or 0) if req.logprobs else None
        budget = self.budget(engine, len(ids), req.token_budget(), default=self.cfg.max_tokens)
        gens = [self.generate_request(engine, req, ids, budget, i, top) for i in range(req.choices())]
        self.admit(engine, gens)
        return gens

    async def check(self) -> None:
        """Health, outside the request queue: every model's engine is alive (`Engine.check`); raises otherwise."""
        for engine in self.engines.values():
            await engine.check()


def _both(first: Callable[[RequestStats], None] | None,
          second: Callable[[RequestStats], None]) -> Callable[[RequestStats], None]:
    def record(stats: RequestStats) -> None:
        if first is not None:
            first(stats)
        second(stats)

    return record


def special_strings(tok: Any) -> list[str]:
    """The strings of the tokenizer's special and added tokens."""
    return sorted({*tok.all_special_tokens, *(str(t) for t in tok.get_added_vocab())} - {""})
