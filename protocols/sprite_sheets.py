"""Sprite sheets over REST: a task's own sheet (made by post-processing), and sheets packed on request
from the images of several finished tasks."""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass
from typing import Annotated

import anyio
import msgspec
from msgspec import Meta
from PIL import Image
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from actors.files import Files
from actors.ingress import Ingress
from actors.postprocess import (
    ANIMATION_PREFIX,
    ASEPRITE_ATLAS,
    GODOT_SPRITE_FRAMES,
    GRID_IMAGE,
    SPRITE_SHEET_ATLAS,
    SPRITE_SHEET_IMAGE,
    TILE_PREVIEW,
)
from engines.sprite_sheet import pack
from forge.auth import Authenticator
from forge.errors import Conflict, NotFound
from forge.ids import TASK_ID, TASK_ID_PATTERN, new_id
from forge.tasks import TaskState
from forge.validation import decode_json
from protocols.http_io import JSONResponse, read_body
from protocols.identity import principal_of, visible_owner
from protocols.views import API

SHEETS = "/v1/sprite-sheets"
MAX_BODY = 64 * 1024


class SheetRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    tasks: Annotated[list[Annotated[str, Meta(pattern=TASK_ID_PATTERN)]], Meta(min_length=1, max_length=64)]
    columns: Annotated[int, Meta(ge=1, le=64)] | None = None
    padding: Annotated[int, Meta(ge=0, le=64)] = 2


class SheetView(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    image: str
    atlas: str
    frames: list[str]


@dataclass(frozen=True)
class SpriteSheetRoutes:
    ingress: Ingress
    results: Files
    auth: Authenticator

    def routes(self) -> list[BaseRoute]:
        return [
            Route(API + "/{id}/sprite-sheet.{kind:str}", self.task_sheet, methods=["GET"]),
            Route(API + "/{id}/animation/{name:str}", self.task_animation, methods=["GET"]),
            Route(API + "/{id}/grid.png", self.task_grid, methods=["GET"]),
            Route(API + "/{id}/tile-previews/{index:int}.png", self.task_tile_preview, methods=["GET"]),
            Route(SHEETS, self.create, methods=["POST"]),
            Route(SHEETS + "/{id}.{kind:str}", self.sheet, methods=["GET"]),
        ]

    async def task_sheet(self, request: Request) -> Response:
        kind = request.path_params["kind"]
        name = {"png": SPRITE_SHEET_IMAGE, "json": SPRITE_SHEET_ATLAS}.get(kind)
        return await self._task_file(request, name, "sprite sheet (ask for postprocess.sprite_sheet)")

    async def task_animation(self, request: Request) -> Response:
        """An animation's files: animation-DIRECTION.gif|webp, animation.aseprite.json, animation.tres."""
        name = request.path_params["name"]
        known = name in (ASEPRITE_ATLAS, GODOT_SPRITE_FRAMES) or _ANIMATION_FILE.match(name) is not None
        return await self._task_file(request, name if known else None, f"file {name!r} (ask for animation)")

    async def task_grid(self, request: Request) -> Response:
        return await self._task_file(request, GRID_IMAGE, "grid (ask for grid)")

    async def task_tile_preview(self, request: Request) -> Response:
        name = TILE_PREVIEW.format(index=request.path_params["index"])
        return await self._task_file(
            request, name, f"tile preview {request.path_params['index']} (ask for tile_preview)"
        )

    async def _task_file(self, request: Request, name: str | None, what: str) -> Response:
        """A file written beside a succeeded task's metadata."""
        owner = visible_owner(await principal_of(request, self.auth))
        record = await self.ingress.get(request.path_params["id"], owner=owner)
        data = None
        if name is not None and record.state is TaskState.SUCCEEDED and record.metadata_path:
            folder = record.metadata_path.rsplit("/", 1)[0]  # the files lie beside the attempt's metadata
            data = await anyio.to_thread.run_sync(self.results.read, f"{folder}/{name}")
        if name is None or data is None:
            raise NotFound(f"generation {record.id} has no {what}", field="id")
        return Response(data, media_type=_MEDIA[name.rsplit(".", 1)[-1]])

    async def create(self, request: Request) -> Response:
        """Pack every image of the given finished tasks, in order, into one atlas."""
        owner = visible_owner(await principal_of(request, self.auth))
        body = await read_body(request, MAX_BODY)
        sheet = decode_json(body, SheetRequest)
        frames: list[tuple[str, str]] = []
        for index, task_id in enumerate(sheet.tasks):
            record = await self.ingress.get(task_id, owner=owner)
            if record.state is not TaskState.SUCCEEDED:
                raise Conflict(f"generation {task_id} is {record.state}, not succeeded", field=f"tasks[{index}]")
            frames += [(f"{task_id}/{i}", name) for i, name in enumerate(record.images)]
        sheet_id = new_id(hashlib.sha256(msgspec.json.encode([owner, sheet])).hexdigest()[:32])
        await anyio.to_thread.run_sync(self._write, sheet_id, frames, sheet)
        view = SheetView(
            id=sheet_id,
            image=f"{SHEETS}/{sheet_id}.png",
            atlas=f"{SHEETS}/{sheet_id}.json",
            frames=[name for name, _ in frames],
        )
        return JSONResponse(view, status_code=201)

    def _write(self, sheet_id: str, frames: list[tuple[str, str]], sheet: SheetRequest) -> None:
        images = []
        for name, file in frames:
            data = self.results.read(file)
            if data is None:
                raise NotFound(f"image {name} is no longer kept", field="tasks")
            with Image.open(io.BytesIO(data)) as image:
                images.append((name, image.convert("RGBA")))
        atlas, document = pack(images, f"{sheet_id}.png", sheet.columns, sheet.padding)
        buffer = io.BytesIO()
        atlas.save(buffer, format="PNG")
        self.results.write(f"sprite-sheets/{sheet_id}.png", buffer.getvalue())
        self.results.write(f"sprite-sheets/{sheet_id}.json", json.dumps(document, indent=1).encode())

    async def sheet(self, request: Request) -> Response:
        await principal_of(request, self.auth)
        sheet_id, kind = request.path_params["id"], request.path_params["kind"]
        data = None
        if kind in _MEDIA and TASK_ID.match(sheet_id):
            data = await anyio.to_thread.run_sync(self.results.read, f"sprite-sheets/{sheet_id}.{kind}")
        if data is None:
            raise NotFound(f"no sprite sheet {sheet_id}.{kind}", field="id")
        return Response(data, media_type=_MEDIA[kind])


_MEDIA = {
    "png": "image/png",
    "json": "application/json",
    "gif": "image/gif",
    "webp": "image/webp",
    "tres": "text/plain; charset=utf-8",
}
_ANIMATION_FILE = re.compile(rf"^{ANIMATION_PREFIX}(s|w|n|e|sw|nw|ne|se)\.(gif|webp)$")
