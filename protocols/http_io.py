"""HTTP helpers shared by the REST routes: msgspec JSON responses, and request bodies read with a limit."""

from __future__ import annotations

import re
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from actors.rate_limits import RateLimited
from forge.errors import ForgeError, InvalidRequest, PayloadTooLarge, ServiceUnavailable

MAX_IDEMPOTENCY_KEY = 255
DISCARD_FACTOR = 8  # an over-long streamed body is read up to this multiple of the limit, then cut


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return msgspec.json.encode(content)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, answering 413 rather than resetting the connection when it is over `limit`."""
    too_large = PayloadTooLarge(f"request body is larger than {limit} bytes", field="body", rule="max_bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > DISCARD_FACTOR * limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
        elif size > DISCARD_FACTOR * limit:  # give up on a client that keeps streaming
            break
    if size > limit:  # read (and dropped) the rest first, so the client gets our answer, not a reset
        raise too_large
    return b"".join(chunks)


def idempotency_key(request: Request) -> str | None:
    """The client's Idempotency-Key header, if it sent one that fits."""
    key = request.headers.get("idempotency-key")
    if key is not None and not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY:
        raise InvalidRequest(
            f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} characters", field="Idempotency-Key", rule="max_length"
        )
    return key


class CollapseSlashes:
    """ASGI middleware: `//sdapi/v1/options` is `/sdapi/v1/options`, as clients that join a base URL ending in a
    slash with a path starting with one (Open WebUI does) expect."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and "//" in scope["path"]:
            path = re.sub("/{2,}", "/", scope["path"])
            scope = {**scope, "path": path, "raw_path": path.encode()}
        await self.app(scope, receive, send)


def retry_headers(exc: ForgeError) -> dict[str, str]:
    """Retry-After for a refusal that a later retry may pass (a rate limit, a 503), else none."""
    return {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, ServiceUnavailable | RateLimited) else {}
