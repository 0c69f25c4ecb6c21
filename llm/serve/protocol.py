"""OpenAI request bodies and error JSON.

Requests are validated strictly (no `"5"` for 5, no `true` for 1) and unknown fields are refused, as
OpenAI does; fields OpenAI accepts but this server cannot honour (`n > 1`, tools) are refused too, and
those that do not change a single greedy/sampled completion (`user`, penalties of 0) are accepted.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

MAX_STOP = 4
NonNegInt = Annotated[int, Field(ge=0)]


class ApiError(Exception):
    """An error answered with OpenAI's error JSON and a 4xx/5xx status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    """`stream_options`: only `include_usage`."""

    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = Field(min_length=1)
    max_tokens: NonNegInt | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)
    presence_penalty: float = Field(0.0, ge=0, le=0)
    frequency_penalty: float = Field(0.0, ge=0, le=0)
    user: str | None = None

    @model_validator(mode="after")
    def _stops(self) -> _Body:
        stops = self.stop_list()
        if len(stops) > MAX_STOP or any(not s for s in stops):
            raise ValueError(f"stop: at most {MAX_STOP} non-empty strings")
        return self

    def stop_list(self) -> list[str]:
        """`stop` as a list."""
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Body):
    """`POST /v1/completions`."""

    prompt: str | list[Annotated[int, Field(ge=0)]] | list[str] | list[list[Annotated[int, Field(ge=0)]]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)
    best_of: int | None = Field(None, ge=1, le=1)
    suffix: None = None

    def prompts(self) -> list[str | list[int]]:
        """One entry per choice: text or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        if not p:
            raise ValueError("prompt: must not be empty")
        return list(p)  # type: ignore[arg-type]


class TextPart(BaseModel):
    """A text part of a message's content list."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text"]
    text: str


class Message(BaseModel):
    """One chat message."""

    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Body):
    """`POST /v1/chat/completions`."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: NonNegInt | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def token_budget(self) -> int | None:
        """`max_completion_tokens` (the newer name) or `max_tokens`."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def parse_body(raw: bytes, kind: type[_Body], max_bytes: int) -> Any:
    """Bytes of a request body to a validated request; every failure is a 4xx `ApiError`."""
    if len(raw) > max_bytes:
        raise ApiError(413, f"request body of {len(raw)} bytes exceeds the limit of {max_bytes} bytes")
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ApiError(400, "request body is not valid UTF-8") from None
    except ValueError as e:
        raise ApiError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    try:
        request = kind.model_validate(data)
        if isinstance(request, CompletionRequest):
            request.prompts()
        return request
    except ValidationError as e:
        raise validation_error(e) from None
    except ValueError as e:
        raise ApiError(400, str(e), param="prompt") from None


def validation_error(e: ValidationError) -> ApiError:
    """The first pydantic error as OpenAI does it: one line naming the parameter."""
    err = e.errors(include_url=False)[0]
    loc = [str(x) for x in err["loc"] if not _is_type_tag(x)]
    param = ".".join(loc) or None
    if err["type"] == "extra_forbidden":
        return ApiError(400, f"Unrecognized request argument supplied: {param}", param=param)
    if err["type"] == "missing":
        return ApiError(400, f"Missing required parameter: '{param}'.", param=param)
    return ApiError(400, f"Invalid value for '{param}': {err['msg']}", param=param)


def _is_type_tag(x: Any) -> bool:
    # pydantic names the union member it tried ("str", "list[int]", "function-after[...]") in the location.
    return isinstance(x, str) and ("[" in x or x in {"str", "int", "list", "float", "bool", "none"})
