"""REST + WebSocket adapter (Starlette): /v1/generations and friends."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import msgspec
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from actors.caller_models import CallerModels
from actors.disk_space import StorageFull, is_disk_full
from actors.encoding import CONTENT_TYPES
from actors.files import Files
from actors.hub import Events
from actors.ingress import Ingress
from actors.lifecycle import final_event
from actors.metrics import Metrics
from engines.schedulers import SAMPLERS
from forge import __version__
from forge.auth import Authenticator
from forge.errors import Forbidden, ForgeError, NotFound
from forge.events import TERMINAL_EVENTS, AnyTaskEvent, Postprocessing, Queued, Started, Succeeded
from forge.logs import request_id as forge_request_id
from forge.requests import GenerationRequest
from forge.tasks import TaskRecord, TaskState
from forge.validation import convert, decode_json
from protocols.a1111_routes import A1111Routes
from protocols.catalog_routes import CatalogRoutes
from protocols.character_routes import CharacterRoutes
from protocols.docs import docs_page
from protocols.http_io import CollapseSlashes, JSONResponse, idempotency_key, read_body, retry_headers
from protocols.identity import principal_of, require_shared_secret, visible_owner
from protocols.openai_routes import OpenAIRoutes
from protocols.openapi import openapi_spec
from protocols.sprite_sheets import SpriteSheetRoutes
from protocols.views import (
    API,
    ErrorBody,
    ErrorView,
    HealthView,
    InfoView,
    ListQuery,
    ModelSummary,
    ReadinessView,
    TaskList,
    TaskView,
    error_view,
    image_url,
    task_view,
)

log = logging.getLogger(__name__)


class UpgradeRequired(ForgeError):
    """A plain HTTP request to a WebSocket endpoint (Starlette alone would answer 404, as if it did not exist)."""

    code = "upgrade_required"
    status = 426


@dataclass(frozen=True)
class Readiness:
    engines: dict[str, bool]  # device: loaded and warm
    needs_engines: bool  # false on an API node, which runs none
    accepting: bool
    storage_full: bool
    store_reachable: bool = True

    @property
    def ready(self) -> bool:
        engines_ok = bool(self.engines) and all(self.engines.values()) if self.needs_engines else True
        return engines_ok and self.accepting and not self.storage_full and self.store_reachable


@dataclass(frozen=True)
class RestApi:
    ingress: Ingress
    hub: Events
    results: Files
    readiness: Callable[[], Readiness]
    metrics: Metrics
    max_body_bytes: int
    auth: Authenticator
    caller_models: CallerModels  # each A1111 caller's model
    admin_key: str = ""
    metrics_token: str = ""
    ws_allowed_origins: frozenset[str] = field(default_factory=frozenset)
    # Bodies that carry images inline (A1111's base64, OpenAI's multipart edits).
    image_body_bytes: int = 64 * 1024 * 1024

    def _probes(self) -> list[Route]:
        return [
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/metrics", self.prometheus, methods=["GET"]),
            Route("/readyz", self.readyz, methods=["GET"]),
        ]

    def probes_app(self) -> Starlette:
        """A worker's: it serves no clients, only its health, readiness and metrics."""
        return Starlette(routes=self._probes(), exception_handlers=self._handlers())

    def _handlers(self) -> dict[Any, Any]:
        return {ForgeError: self._forge_error, HTTPException: self._http_error, Exception: self._unexpected_error}

    def app(self) -> Starlette:
        routes = [
            Route(API, self.generations, methods=["GET", "POST"]),
            Route(API + "/{id}", self.get, methods=["GET"]),
            Route(API + "/{id}/cancel", self.cancel, methods=["POST"]),
            Route(API + "/{id}/images/{index:int}", self.image, methods=["GET"]),
            WebSocketRoute(API + "/{id}/events", self.events),
            Route(API + "/{id}/events", self.events_without_upgrade, methods=["GET"]),
            *CatalogRoutes(self.ingress, self.admin_key, self.auth).routes(),
            *SpriteSheetRoutes(self.ingress, self.results, self.auth).routes(),
            *CharacterRoutes(self.ingress, self.auth, self.max_body_bytes).routes(),
            *A1111Routes(
                self.ingress, self.hub, self.results, self.auth, self.image_body_bytes, self.caller_models
            ).routes(),
            *OpenAIRoutes(self.ingress, self.hub, self.results, self.auth, self.image_body_bytes).routes(),
            Route("/v1/info", self.info, methods=["GET"]),
            *self._probes(),
            Route("/openapi.json", lambda _: JSONResponse(spec), methods=["GET"]),
            Route("/docs", lambda _: HTMLResponse(docs_page(spec)), methods=["GET"]),
        ]
        spec = openapi_spec(routes)
        return Starlette(routes=routes, exception_handlers=self._handlers(), middleware=[Middleware(CollapseSlashes)])

    # -- generations --

    async def generations(self, request: Request) -> Response:
        """One route for both methods, so a 405 lists both in its Allow header."""
        return await (self.create(request) if request.method == "POST" else self.list_generations(request))

    async def create(self, request: Request) -> Response:
        body = await read_body(request, self.max_body_bytes)
        generation = decode_json(body, GenerationRequest)
        key = idempotency_key(request)
        request_id = forge_request_id(request.headers.get("x-request-id"))
        principal = await principal_of(request, self.auth)
        record, reuse = await self.ingress.submit(
            generation, principal=principal, idempotency_key=key, request_id=request_id
        )
        view = await self._view(record)
        headers = {"Location": view.links.self, "X-Request-Id": request_id}
        if reuse == "idempotent":
            headers["Idempotent-Replayed"] = "true"
        elif reuse == "cached":  # the same images existed already: this is the task that made them
            headers["Result-Cache"] = "hit"
        return JSONResponse(view, status_code=202, headers=headers)

    async def get(self, request: Request) -> Response:
        owner = visible_owner(await principal_of(request, self.auth))
        return JSONResponse(await self._view(await self.ingress.get(request.path_params["id"], owner=owner)))

    async def cancel(self, request: Request) -> Response:
        owner = visible_owner(await principal_of(request, self.auth))
        record = await self.ingress.cancel(request.path_params["id"], owner=owner)
        return JSONResponse(await self._view(record), status_code=200 if record.state.is_terminal else 202)

    async def list_generations(self, request: Request) -> Response:
        """Newest first; `cursor` is the last page's `next_cursor`, or a task id to list the tasks before it."""
        query = convert(dict(request.query_params), ListQuery, strict=False)
        owner = visible_owner(await principal_of(request, self.auth))
        before_seq = int(query.cursor) if query.cursor and query.cursor.isdigit() else None
        before_id = query.cursor if query.cursor and not query.cursor.isdigit() else None
        found = await self.ingress.list(
            owner=owner, state=query.state, limit=query.limit, before_seq=before_seq, before_id=before_id
        )
        cursor = str(found[-1].seq) if len(found) == query.limit else None
        return JSONResponse(TaskList(items=[await self._view(record) for record in found], next_cursor=cursor))

    async def image(self, request: Request) -> Response:
        owner = visible_owner(await principal_of(request, self.auth))
        record = await self.ingress.get(request.path_params["id"], owner=owner)
        index: int = request.path_params["index"]
        if not 0 <= index < len(record.images):
            raise NotFound(f"generation {record.id} has no image {index} (state {record.state})", field="index")
        name = record.images[index]
        data = await anyio.to_thread.run_sync(self.results.read, name)
        if data is None:
            raise NotFound(f"image {index} of generation {record.id} is no longer kept", field="index")
        return Response(
            data,
            media_type=CONTENT_TYPES[name.rsplit(".", 1)[-1]],
            headers={"Cache-Control": "private, max-age=31536000, immutable"},
        )

    # -- progress over WebSocket --

    async def events(self, websocket: WebSocket) -> None:
        origin = websocket.headers.get("origin")
        await websocket.accept()
        try:
            if self.auth.enabled and origin is not None and origin not in self.ws_allowed_origins:
                raise Forbidden(f"Origin {origin} may not open this WebSocket", field="Origin")
            owner = visible_owner(await principal_of(websocket, self.auth))
            await self._stream_events(websocket, websocket.path_params["id"], owner)
        except ForgeError as exc:  # refused, not found, or the store out of reach (4503: retry)
            await websocket.send_text(msgspec.json.encode(error_view(exc)).decode())
            await websocket.close(code=4000 + exc.status)

    async def _stream_events(self, websocket: WebSocket, task_id: str, owner: str | None) -> None:
        async with self.hub.subscribe(task_id) as stream:
            record = await self.ingress.get(task_id, owner=owner)
            for event in await self._snapshot(record):
                await websocket.send_text(msgspec.json.encode(event).decode())
            if record.state.is_terminal:
                await websocket.close()
                return
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._cancel_on_disconnect, websocket, tg.cancel_scope)
                async for event in stream:
                    await websocket.send_text(msgspec.json.encode(self._public(event)).decode())
                    if isinstance(event, TERMINAL_EVENTS):
                        break
                else:  # too slow to take the final event: send the state as it now stands
                    for event in await self._snapshot(await self.ingress.get(task_id, owner=owner)):
                        await websocket.send_text(msgspec.json.encode(event).decode())
                tg.cancel_scope.cancel()
        await websocket.close()

    async def events_without_upgrade(self, request: Request) -> Response:
        raise UpgradeRequired(
            f"{request.url.path} is a WebSocket: connect with ws:// (or wss://), not a plain GET", field="Upgrade"
        )

    @staticmethod
    async def _cancel_on_disconnect(websocket: WebSocket, scope: anyio.CancelScope) -> None:
        try:
            while True:
                await websocket.receive_text()
        except (WebSocketDisconnect, RuntimeError, KeyError):
            scope.cancel()

    async def _snapshot(self, record: TaskRecord) -> list[AnyTaskEvent]:
        task_id = record.id
        live = await self.ingress.live(record)
        match record.state:
            case TaskState.QUEUED:
                return [Queued(task_id=task_id, position=live.position or 0)]
            case TaskState.RUNNING:
                if not live.device:  # marked running but not yet handed to an engine: its `started` is on its way
                    return []
                started = Started(
                    task_id=task_id, attempt=record.attempt, device=live.device, batch=live.batch, worker=live.worker
                )
                return [started] if live.progress is None else [started, live.progress]
            case TaskState.POSTPROCESSING:
                return [Postprocessing(task_id=task_id)]
        final = final_event(record)
        assert final is not None, record.state
        return [self._public(final)]

    @staticmethod
    def _public(event: AnyTaskEvent) -> AnyTaskEvent:
        """Clients get image URLs, never paths on disk."""
        if isinstance(event, Succeeded):
            return Succeeded(
                task_id=event.task_id, images=[image_url(event.task_id, i) for i in range(len(event.images))]
            )
        return event

    # -- service --

    async def info(self, request: Request) -> Response:
        await principal_of(request, self.auth)
        model = self.ingress.model
        summary = ModelSummary(
            name=model.name,
            is_tiny=model.is_tiny,
            default_size=model.default_size,
            min_size=model.min_size,
            max_size=model.max_size,
            default_steps=model.default_steps,
            default_guidance=model.default_guidance,
        )
        return JSONResponse(
            InfoView(
                version=__version__,
                model=summary,
                schedulers=list(SAMPLERS),
                output_formats=["png", "webp", "jpeg"],
                engines=self.readiness().engines,
            )
        )

    async def prometheus(self, request: Request) -> Response:
        if self.metrics_token:
            require_shared_secret(request, self.metrics_token, "metrics token")
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def healthz(self, request: Request) -> Response:
        return JSONResponse(HealthView("ok"))

    async def readyz(self, request: Request) -> Response:
        state = self.readiness()
        view = ReadinessView(
            ready=state.ready,
            accepting=state.accepting,
            engines=state.engines,
            storage_full=state.storage_full,
            store_reachable=state.store_reachable,
        )
        return JSONResponse(view, status_code=200 if state.ready else 503)

    # -- helpers --

    async def _view(self, record: TaskRecord) -> TaskView:
        return task_view(record, await self.ingress.live(record))

    async def _forge_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ForgeError)
        self.metrics.rejected(exc.code)
        headers = retry_headers(exc)
        if isinstance(exc, UpgradeRequired):
            headers["Upgrade"] = "websocket"
        return JSONResponse(error_view(exc), status_code=exc.status, headers=headers)

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(
            ErrorBody(ErrorView(code=code, message=str(exc.detail))), status_code=exc.status_code, headers=exc.headers
        )

    async def _unexpected_error(self, request: Request, exc: Exception) -> Response:
        if is_disk_full(exc):  # an upload or a sprite sheet that could not be written
            return await self._forge_error(request, StorageFull())
        log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse(
            ErrorBody(ErrorView(code="internal_error", message="internal error; see server log")), status_code=500
        )
