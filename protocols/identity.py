"""The caller of an HTTP request or WebSocket, for the REST routes."""

from __future__ import annotations

import hmac
from ipaddress import ip_address

import anyio
import msgspec
from starlette.requests import HTTPConnection
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from forge.auth import Authenticator, Principal, Unauthorized
from forge.errors import Forbidden, ForgeError


async def principal_of(connection: HTTPConnection, auth: Authenticator, *, basic: bool = False) -> Principal:
    """From `Authorization: Bearer` (with `basic`, also `Basic`: see `Authenticator.principal`), or for a
    WebSocket (browsers cannot set headers) `?access_token=`."""
    header = connection.headers.get("authorization")
    if header is None and connection.scope["type"] == "websocket" and "access_token" in connection.query_params:
        header = f"Bearer {connection.query_params['access_token']}"
    if not auth.enabled:  # the local user, whatever the header says
        return auth.principal(header, basic=basic)
    return await anyio.to_thread.run_sync(lambda: auth.principal(header, basic=basic))  # keys live in SQLite


def is_loopback(host: str) -> bool:
    """An address (or `localhost`) that only this machine can reach."""
    if host == "localhost":
        return True
    try:
        return ip_address(host).is_loopback
    except ValueError:
        return False


def visible_owner(principal: Principal) -> str | None:
    """Whose tasks the caller may see: their own, or everyone's for an admin."""
    return None if principal.is_admin else principal.owner


def require_shared_secret(connection: HTTPConnection, secret: str, name: str) -> None:
    """`Authorization: Bearer <secret>`, compared in constant time: 401 without a token, 403 with another."""
    scheme, _, token = connection.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized(f"{connection.url.path} needs Authorization: Bearer <{name}>", field="Authorization")
    if not hmac.compare_digest(token.encode(), secret.encode()):
        raise Forbidden(f"wrong {name}", field="Authorization")


def require_admin(principal: Principal) -> None:
    if not principal.is_admin:
        raise Forbidden("this needs the admin scope", field="Authorization")


class RequireBearer:
    """ASGI middleware: with auth on, every HTTP request needs a valid bearer token, or gets 401."""

    def __init__(self, app: ASGIApp, auth: Authenticator) -> None:
        self.app = app
        self.auth = auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.auth.enabled:
            try:
                await principal_of(HTTPConnection(scope), self.auth)
            except ForgeError as exc:
                body = msgspec.json.encode({"error": {"code": exc.code, "message": exc.message, "field": exc.field}})
                response = Response(body, status_code=exc.status, media_type="application/json")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
