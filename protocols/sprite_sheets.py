"""Sprite sheets over REST: a task's own sheet (made by post-processing), and sheets packed on request
from the images of several finished tasks."""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import anyio
import msgspec
from msgspec import Meta
from PIL import Image
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Route

from actors.encoding import write_atomically
from actors.ingress import Ingress
from actors.postprocess import SPRITE_SHEET_ATLAS, SPRITE_SHEET_IMAGE
from engines.sprite_sheet import pack
from forge.auth import Authenticator
from forge.errors import Conflict, NotFound
from forge.nodes import TASK_ID, TASK_ID_PATTERN, new_id
from forge.tasks import TaskState
from forge.validation import decode_json
from protocols.http_io import JSONResponse, read_body
from protocols.identity import principal_of, visible_owner
from protocols.peers import PeerResponse, Peers
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
    outputs: Path
    auth: Authenticator
    peers: Peers

    def routes(self) -> list[BaseRoute]:
        return [
            Route(API + "/{id}/sprite-sheet.{kind:str}", self.task_sheet, methods=["GET"]),
            Route(SHEETS, self.create, methods=["POST"]),
            Route(SHEETS + "/{id}.{kind:str}", self.sheet, methods=["GET"]),
        ]

    async def task_sheet(self, request: Request) -> Response:
        owner = visible_owner(await principal_of(request, self.auth))
        record = await self.ingress.get(request.path_params["id"], owner=owner)
        name = {"png": SPRITE_SHEET_IMAGE, "json": SPRITE_SHEET_ATLAS}.get(request.path_params["kind"])
        path = self.outputs / record.id / (name or "")
        if name is None or record.state is not TaskState.SUCCEEDED or not path.is_file():
            raise NotFound(f"generation {record.id} has no sprite sheet (ask for postprocess.sprite_sheet)", field="id")
        return FileResponse(path, media_type="image/png" if name.endswith(".png") else "application/json")

    async def create(self, request: Request) -> Response:
        """Pack every image of the given finished tasks, in order, into one atlas."""
        owner = visible_owner(await principal_of(request, self.auth))
        body = await read_body(request, MAX_BODY)
        sheet = decode_json(body, SheetRequest)
        several = "a sheet packs the generations of one server; these were made by several"
        if (holder := self.peers.holder(sheet.tasks, field="tasks", several=several)) is not None:
            return PeerResponse(holder, self.peers.node_id, body)
        frames: list[tuple[str, Path]] = []
        for index, task_id in enumerate(sheet.tasks):
            record = await self.ingress.get(task_id, owner=owner)
            if record.state is not TaskState.SUCCEEDED:
                raise Conflict(f"generation {task_id} is {record.state}, not succeeded", field=f"tasks[{index}]")
            frames += [(f"{task_id}/{i}", self.outputs / path) for i, path in enumerate(record.images)]
        sheet_id = new_id(self.peers.node_id, hashlib.sha256(msgspec.json.encode([owner, sheet])).hexdigest()[:32])
        await anyio.to_thread.run_sync(self._write, sheet_id, frames, sheet)
        view = SheetView(
            id=sheet_id,
            image=f"{SHEETS}/{sheet_id}.png",
            atlas=f"{SHEETS}/{sheet_id}.json",
            frames=[name for name, _ in frames],
        )
        return JSONResponse(view, status_code=201)

    def _write(self, sheet_id: str, frames: list[tuple[str, Path]], sheet: SheetRequest) -> None:
        images = []
        for name, path in frames:
            with Image.open(path) as image:
                images.append((name, image.convert("RGBA")))
        atlas, document = pack(images, f"{sheet_id}.png", sheet.columns, sheet.padding)
        buffer = io.BytesIO()
        atlas.save(buffer, format="PNG")
        folder = self.outputs / "sprite-sheets"
        write_atomically(folder / f"{sheet_id}.png", buffer.getvalue())
        write_atomically(folder / f"{sheet_id}.json", json.dumps(document, indent=1).encode())

    async def sheet(self, request: Request) -> Response:
        await principal_of(request, self.auth)
        sheet_id, kind = request.path_params["id"], request.path_params["kind"]
        path = self.outputs / "sprite-sheets" / f"{sheet_id}.{kind}"
        if kind not in ("png", "json") or not TASK_ID.match(sheet_id) or not path.is_file():
            raise NotFound(f"no sprite sheet {sheet_id}.{kind}", field="id")
        return FileResponse(path, media_type="image/png" if kind == "png" else "application/json")
