"""Several servers behind one address: a request that names another server's task or sprite sheet is answered
by that server, relayed through this one, so a plain round-robin load balancer in front of them works.

Which server made an id is written in the id (forge/nodes.py); `peers` maps node ids to base URLs. The
caller's credential travels with the request and the owning server checks it, so both must know it (a JWT
key in their config, or API keys copied with `chara-forge keys export | import`). A relayed request carries
FORWARDED_FROM and is never relayed again, so a wrong peer table cannot make a loop.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property

import anyio
import httpx
import msgspec
from httpx_ws import HTTPXWSException, WebSocketDisconnect, aconnect_ws
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketState
from starlette.websockets import WebSocketDisconnect as ClientDisconnect

from forge.errors import ForgeError, InvalidRequest
from forge.nodes import node_of
from protocols.views import API, error_view

log = logging.getLogger(__name__)

FORWARDED_FROM = "x-forge-forwarded-from"
# Paths whose first id names the server that holds what they ask for.
_ROUTED = re.compile(rf"^(?:{API}/(?P<task>[^/]+)(?:/.*)?|/v1/sprite-sheets/(?P<sheet>[^/]+)\.(?:png|json))$")
# Headers that describe one hop, not the message (RFC 9110 §7.6.1); a request also loses those httpx sets
# itself, and an answer those this server's HTTP layer adds.
_HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade"}
_NOT_RELAYED_UP = _HOP_BY_HOP | {b"host", b"content-length"}
_NOT_RELAYED_DOWN = _HOP_BY_HOP | {b"date", b"server"}
PEER_TIMEOUT = httpx.Timeout(connect=5.0, read=120.0, write=60.0, pool=5.0)  # a cancel may wait 10 s for the engine
_MAX_WS_MESSAGE = 1 << 20
# Close codes a WebSocket reports but may not send (RFC 6455 §7.4.1).
_UNSENDABLE_CLOSE_CODES = {1005, 1006, 1015}


class PeerUnreachable(ForgeError):
    code = "peer_unreachable"
    status = 502


@dataclass(frozen=True)
class Peers:
    node_id: str
    urls: Mapping[str, str]

    @cached_property
    def others(self) -> dict[str, str]:
        """The other servers' base URLs, by node id."""
        return {node: url.rstrip("/") for node, url in self.urls.items() if node != self.node_id}

    def url_for(self, some_id: str) -> str | None:
        """The base URL of the other server that made `some_id`, if it is one of the peers."""
        node = node_of(some_id)
        return None if node is None else self.others.get(node)

    def holder(self, ids: Iterable[str], *, field: str, several: str) -> str | None:
        """The base URL of the other server that made every one of `ids`; None when this server did (or they
        name no peer). Ids of several servers are a 422 on `field`, with the message `several`."""
        holders = {self.url_for(some_id) for some_id in ids}  # None stands for this server
        if len(holders) > 1:
            raise InvalidRequest(several, field=field, rule="server")
        return holders.pop() if holders else None


NO_PEERS = Peers(node_id="", urls={})


class PeerRouting:
    """Starlette middleware: requests for another server's tasks and sheets go to that server."""

    def __init__(self, app: ASGIApp, peers: Peers) -> None:
        self.app = app
        self.peers = peers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        target = self._target(scope)
        if target is None:
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await _relay_websocket(WebSocket(scope, receive, send), target, self.peers.node_id)
        else:
            await PeerResponse(target, self.peers.node_id)(scope, receive, send)

    def _target(self, scope: Scope) -> str | None:
        if scope["type"] not in ("http", "websocket") or is_relayed(scope):
            return None
        match = _ROUTED.match(scope["path"])
        some_id = match and (match["task"] or match["sheet"])
        return self.peers.url_for(some_id) if some_id else None


class PeerResponse(Response):
    """The answer of the peer at `base_url` to this same request (method, path, query, headers, body), streamed
    back. A route that has already read the body passes it as `body`."""

    def __init__(self, base_url: str, node_id: str, body: bytes | None = None) -> None:
        super().__init__()
        self._base_url = base_url
        self._node_id = node_id
        self._body = body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = self._body if self._body is not None else _body_chunks(receive)
        url = self._base_url + _path_and_query(scope)
        headers = relay_headers(scope, self._node_id)
        started = False
        try:
            async with (
                httpx.AsyncClient(timeout=PEER_TIMEOUT) as client,
                client.stream(scope["method"], url, headers=headers, content=body) as upstream,
            ):
                relayed = [(k, v) for k, v in upstream.headers.raw if k.lower() not in _NOT_RELAYED_DOWN]
                await send({"type": "http.response.start", "status": upstream.status_code, "headers": relayed})
                started = True
                async for chunk in upstream.aiter_raw():  # as sent, so content-length and -encoding still hold
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
        except httpx.TransportError as exc:
            error = _unreachable(self._base_url, exc)
            if started:  # cut off mid-answer: the client sees a short body, as from the peer itself
                raise
            answer = Response(msgspec.json.encode(error_view(error)), error.status, media_type="application/json")
            await answer(scope, receive, send)


async def _relay_websocket(websocket: WebSocket, base_url: str, node_id: str) -> None:
    url = re.sub(r"^http", "ws", base_url) + _path_and_query(websocket.scope)
    headers = httpx.Headers(relay_headers(websocket.scope, node_id, websocket=True))
    close_code = 1000
    try:
        async with (
            httpx.AsyncClient(timeout=PEER_TIMEOUT) as client,
            aconnect_ws(url, client, headers=headers, max_message_size_bytes=_MAX_WS_MESSAGE) as upstream,
        ):
            await websocket.accept()
            async with anyio.create_task_group() as relay:

                async def client_to_peer() -> None:
                    with contextlib.suppress(ClientDisconnect, RuntimeError):
                        while True:
                            await upstream.send_text(await websocket.receive_text())
                    relay.cancel_scope.cancel()

                relay.start_soon(client_to_peer)
                try:
                    while True:
                        await websocket.send_text(await upstream.receive_text())
                except WebSocketDisconnect as closed:
                    close_code = closed.code if closed.code not in _UNSENDABLE_CLOSE_CODES else 1000
                relay.cancel_scope.cancel()
    except (httpx.TransportError, HTTPXWSException) as exc:
        error = _unreachable(base_url, exc)
        with contextlib.suppress(ClientDisconnect, RuntimeError):
            if websocket.client_state is WebSocketState.CONNECTING:
                await websocket.accept()
            await websocket.send_text(msgspec.json.encode(error_view(error)).decode())
        close_code = 4000 + error.status
    with contextlib.suppress(ClientDisconnect, RuntimeError):
        await websocket.close(close_code)


def _unreachable(base_url: str, exc: Exception) -> PeerUnreachable:
    log.warning("peer %s did not answer: %s", base_url, exc)
    return PeerUnreachable(f"the server that holds this ({base_url}) did not answer: {exc}", field="id")


def _path_and_query(scope: Scope) -> str:
    path: bytes = scope.get("raw_path") or scope["path"].encode()
    query: bytes = scope.get("query_string", b"")
    return (path + (b"?" + query if query else b"")).decode("latin-1")


def relay_headers(scope: Scope, node_id: str, *, websocket: bool = False) -> list[tuple[bytes, bytes]]:
    """The request's own headers, marked as relayed by `node_id`; for a WebSocket, only those that say who
    asks (httpx-ws makes the handshake)."""
    kept = (b"authorization", b"origin", b"x-request-id", b"user-agent")
    own = [
        (name, value)
        for name, value in scope["headers"]
        if name.lower() not in _NOT_RELAYED_UP and (not websocket or name.lower() in kept)
    ]
    return [*own, (FORWARDED_FROM.encode(), node_id.encode())]


def is_relayed(scope: Scope) -> bool:
    return any(name.lower() == FORWARDED_FROM.encode() for name, _ in scope["headers"])


async def _body_chunks(receive: Receive) -> AsyncIterator[bytes]:
    """The request body as it arrives; the peer applies its own size limit."""
    while True:
        message: Message = await receive()
        if message["type"] != "http.request":
            return
        yield message.get("body", b"")
        if not message.get("more_body", False):
            return
