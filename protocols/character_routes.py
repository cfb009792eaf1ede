"""REST routes of the character library: /v1/characters, /v1/characters/{id} and its sheets."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from actors.ingress import Ingress
from forge.auth import Authenticator
from forge.characters import (
    CharacterAnimationRequest,
    CharacterCreate,
    CharacterList,
    CharacterPatch,
    CharacterSheetRequest,
    animation_generation,
    sheet_generation,
)
from forge.validation import decode_json
from protocols.http_io import JSONResponse, read_body
from protocols.identity import principal_of, visible_owner
from protocols.views import task_view

CHARACTERS = "/v1/characters"


@dataclass(frozen=True)
class CharacterRoutes:
    ingress: Ingress
    auth: Authenticator
    max_body_bytes: int

    def routes(self) -> list[BaseRoute]:
        return [
            Route(CHARACTERS, self.collection, methods=["GET", "POST"]),
            Route(CHARACTERS + "/{id}", self.one, methods=["GET", "PATCH", "DELETE"]),
            Route(CHARACTERS + "/{id}/sheets", self.sheet, methods=["POST"]),
            Route(CHARACTERS + "/{id}/animations", self.animation, methods=["POST"]),
        ]

    async def sheet(self, request: Request) -> Response:
        """A sheet of the character as one generation task (202, like POST /v1/generations)."""
        principal = await principal_of(request, self.auth)
        sheet = decode_json(await read_body(request, self.max_body_bytes), CharacterSheetRequest)
        sheet.check()
        character = await self.ingress.characters.get(request.path_params["id"], owner=visible_owner(principal))
        record, _ = await self.ingress.submit(sheet_generation(character.id, sheet), principal=principal)
        view = task_view(record, await self.ingress.live(record))
        return JSONResponse(view, status_code=202, headers={"Location": view.links.self})

    async def animation(self, request: Request) -> Response:
        """An animation cycle of the character as one generation task (202, like POST /v1/generations)."""
        principal = await principal_of(request, self.auth)
        body = decode_json(await read_body(request, self.max_body_bytes), CharacterAnimationRequest)
        character = await self.ingress.characters.get(request.path_params["id"], owner=visible_owner(principal))
        record, _ = await self.ingress.submit(animation_generation(character.id, body), principal=principal)
        view = task_view(record, await self.ingress.live(record))
        return JSONResponse(view, status_code=202, headers={"Location": view.links.self})

    async def collection(self, request: Request) -> Response:
        principal = await principal_of(request, self.auth)
        library = self.ingress.characters
        if request.method == "GET":  # the caller's own; an admin's: everyone's
            return JSONResponse(CharacterList(await library.list(owner=visible_owner(principal))))
        create = decode_json(await read_body(request, self.max_body_bytes), CharacterCreate)
        character = await library.create(principal.owner, create)
        return JSONResponse(character, status_code=201, headers={"Location": f"{CHARACTERS}/{character.id}"})

    async def one(self, request: Request) -> Response:
        owner = visible_owner(await principal_of(request, self.auth))
        library, character_id = self.ingress.characters, request.path_params["id"]
        if request.method == "GET":
            return JSONResponse(await library.get(character_id, owner=owner))
        if request.method == "PATCH":
            patch = decode_json(await read_body(request, self.max_body_bytes), CharacterPatch)
            return JSONResponse(await library.update(character_id, patch, owner=owner))
        await library.delete(character_id, owner=owner)
        return Response(status_code=204)
