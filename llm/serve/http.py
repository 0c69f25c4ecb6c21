"""What every request passes before its route: the body read within its size limit and declared as JSON,
and, bound to loopback, a `Host` that names this machine."""

from __future__ import annotations

from fastapi import Request

from llm.config.serve import LOOPBACK
from llm.serve.protocol import ApiError


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 415 when it is declared as something other than JSON (a web page's form post
    or `text/plain`) and with 413 as soon as it passes `limit` bytes (counted while reading, never buffered
    past it)."""
    kind = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if kind and kind != "application/json" and not kind.endswith("+json"):
        raise ApiError(415, f"Content-Type {kind} is not supported; send application/json")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


LOCAL_NAMES = {*LOOPBACK, "[::1]"}


def host_allowed(cfg_host: str, header: str | None) -> bool:
    """Bound to loopback, only requests addressed to a loopback name are served: a web page that rebinds
    its own DNS name to 127.0.0.1 cannot drive the local server (its requests carry its own `Host`)."""
    if cfg_host not in LOCAL_NAMES or not header:
        return True
    name = header.rsplit(":", 1)[0] if not header.endswith("]") else header
    return name.lower() in LOCAL_NAMES
