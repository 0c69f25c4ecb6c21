"""OpenAI request bodies as vLLM's OpenAI server accepts them, and error JSON.

Types are checked strictly (no `"5"` for 5, no `true` for 1), `null` stands for the default wherever OpenAI
allows it, and the sampling extensions load and eval tools send (`top_k`, `min_p`, `repetition_penalty`,
`ignore_eos`, `stop_token_ids`, ...) are honoured. Fields this server does not know are ignored and logged
once per name, as vLLM does, so a client built for another server still works; a field it knows but cannot
honour (`tools` on a model whose template has none, a JSON `response_format`) is a 400 naming it.
"""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

log = logging.getLogger("ray.serve")

MAX_STOP = 16
MAX_STOP_CHARS = 256
"""Longer stop strings are refused: each is matched against every new piece of text."""
NonNegInt = Annotated[int, Field(ge=0)]
TokenId = Annotated[int, Field(ge=0)]
Seed = Annotated[int, Field(ge=-(2**63), le=2**64 - 1)]  # what torch.Generator.manual_seed takes
_LOGGED: set[str] = set()


class ApiError(Exception):
    """An error answered with OpenAI's error JSON and a 4xx/5xx status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    """`stream_options`: a usage chunk at the end, and (vLLM) usage on every chunk."""

    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class _Body(BaseModel):
    # Unknown fields are kept (and logged once each by `parse_body`), never refused.
    model_config = ConfigDict(extra="allow", strict=True)

    model: str = Field(min_length=1)
    max_tokens: NonNegInt | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[TokenId] | None = None
    include_stop_str_in_output: bool | None = False
    ignore_eos: bool | None = False
    min_tokens: NonNegInt | None = 0
    skip_special_tokens: bool | None = True
    seed: Seed | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(1, ge=1, le=64)
    user: str | None = None

    @model_validator(mode="after")
    def _stops(self) -> _Body:
        stops = self.stop_list()
        if len(stops) > MAX_STOP or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop: at most {MAX_STOP} non-empty strings of at most {MAX_STOP_CHARS} characters")
        for key in self.logit_bias or {}:
            if not key.isdigit():
                raise ValueError(f"logit_bias: keys are token ids, got {key!r}")
        return self

    def stop_list(self) -> list[str]:
        """`stop` as a list."""
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)

    def continuous_usage(self) -> bool:
        """Whether every stream chunk carries the usage so far (vLLM's `continuous_usage_stats`)."""
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)

    def choices(self) -> int:
        """Choices per prompt."""
        return self.n or 1


class CompletionRequest(_Body):
    """`POST /v1/completions`."""

    prompt: str | list[TokenId] | list[str] | list[list[TokenId]]
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=20)
    best_of: int | None = Field(None, ge=1, le=64)
    suffix: str | None = None

    @model_validator(mode="after")
    def _known_but_impossible(self) -> CompletionRequest:
        if self.suffix:
            raise ValueError("suffix: insertion is not supported by this server")
        if self.best_of is not None and self.best_of < self.choices():
            raise ValueError(f"best_of: must be >= n ({self.choices()})")
        if self.best_of is not None and self.best_of > 1 and self.stream:
            raise ValueError("best_of: cannot be used with stream (the best choice is known only at the end)")
        return self

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        if not p:
            raise ValueError("prompt: must not be empty")
        return list(p)  # type: ignore[arg-type]

    def candidates(self) -> int:
        """Sequences generated per prompt (`best_of`, else `n`)."""
        return max(self.best_of or 1, self.choices())


class TextPart(BaseModel):
    """A text part of a message's content list."""

    model_config = ConfigDict(extra="ignore", strict=True)

    type: Literal["text"]
    text: str


class Message(BaseModel):
    """One chat message."""

    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _content(self) -> Message:
        if self.content is None and self.role != "assistant":  # only an assistant turn may carry none
            raise ValueError(f"content: required for a {self.role} message")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ResponseFormat(BaseModel):
    """`response_format`: only plain text; JSON modes need guided decoding, which this engine has not."""

    model_config = ConfigDict(extra="allow", strict=True)

    type: Literal["text", "json_object", "json_schema"]


class ChatRequest(_Body):
    """`POST /v1/chat/completions`."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: NonNegInt | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    add_generation_prompt: bool | None = True
    continue_final_message: bool | None = False

    @model_validator(mode="after")
    def _known_but_impossible(self) -> ChatRequest:
        if self.response_format is not None and self.response_format.type != "text":
            raise ValueError(f"response_format: {self.response_format.type} needs guided decoding, which this "
                             "server does not do; ask for text")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs: true")
        if isinstance(self.tool_choice, dict) or self.tool_choice == "required":
            raise ValueError("tool_choice: forcing a tool call needs guided decoding, which this server does not do")
        return self

    def token_budget(self) -> int | None:
        """`max_completion_tokens` (the newer name) or `max_tokens`."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class TokenizeRequest(BaseModel):
    """`POST /tokenize` (vLLM's shape): a prompt, or messages rendered with the chat template."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    add_special_tokens: bool | None = True
    add_generation_prompt: bool | None = True
    return_token_strs: bool | None = False

    @model_validator(mode="after")
    def _one(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("prompt: give exactly one of prompt or messages")
        return self


class DetokenizeRequest(BaseModel):
    """`POST /detokenize` (vLLM's shape)."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str | None = None
    tokens: list[TokenId]


def parse_body(raw: bytes, kind: type[BaseModel]) -> Any:
    """Bytes of a request body to a validated request; every failure is a 4xx `ApiError`."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "request body is not valid UTF-8") from None
    try:
        data = json.loads(text)
    except RecursionError:
        raise ApiError(400, "request body nests too deep to parse") from None
    except ValueError as e:
        raise ApiError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    try:
        request = kind.model_validate(data)
        if isinstance(request, CompletionRequest):
            request.prompts()
    except ValidationError as e:
        raise validation_error(e) from None
    except ValueError as e:
        raise ApiError(400, str(e), param="prompt") from None
    _log_unknown(request)
    return request


def _log_unknown(request: BaseModel) -> None:
    for name in request.model_extra or {}:
        if name not in _LOGGED:
            _LOGGED.add(name)
            log.warning("ignoring request field %r (not used by this server)", name)


def validation_error(e: ValidationError) -> ApiError:
    """The first pydantic error as OpenAI does it: one line naming the parameter."""
    err = e.errors(include_url=False)[0]
    loc = [str(x) for x in err["loc"] if not _is_type_tag(x)]
    param = ".".join(loc) or None
    if err["type"] == "missing":
        return ApiError(400, f"Missing required parameter: '{param}'.", param=param)
    if err["type"] == "value_error" and not loc:  # a model validator: its message names the parameter
        msg = str(err["msg"]).removeprefix("Value error, ")
        return ApiError(400, msg, param=msg.split(":", 1)[0])
    return ApiError(400, f"Invalid value for '{param}': {err['msg']}", param=param)


def _is_type_tag(x: Any) -> bool:
    # pydantic names the union member it tried ("str", "list[int]", "function-after[...]") in the location.
    return isinstance(x, str) and ("[" in x or x in {"str", "int", "list", "float", "bool", "none"})
