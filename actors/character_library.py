"""The character library as ingress offers it: owner checks, reference images stored as uploads, versions,
and a character's description and defaults merged under a generation request's own fields."""

from __future__ import annotations

import re
import time
import uuid
from functools import partial

import anyio
import msgspec

from actors.characters import CharacterStore, NameTaken
from actors.uploads import UploadStore
from forge.characters import CHARACTER_ID, Character, CharacterCreate, CharacterPatch, CharacterRef
from forge.errors import Conflict, NotFound
from forge.requests import GenerationRequest, ReferenceRequest

_ID = re.compile(CHARACTER_ID)


class CharacterLibrary:
    def __init__(self, store: CharacterStore, uploads: UploadStore) -> None:
        self._store = store
        self._uploads = uploads

    async def _references(self, images: list[str], field: str) -> list[str]:
        saved = []
        for index, image in enumerate(images):
            save = partial(self._uploads.save_inline, image, field=f"{field}[{index}]")
            saved.append(await anyio.to_thread.run_sync(save))
        return saved

    async def create(self, owner: str, request: CharacterCreate) -> Character:
        now = time.time()
        character = Character(
            id=f"ch_{uuid.uuid4().hex}",
            owner=owner,
            name=request.name,
            description=request.description,
            references=await self._references(request.references, "references"),
            defaults=request.defaults,
            version=1,
            created_at=now,
            updated_at=now,
        )
        try:
            await anyio.to_thread.run_sync(self._store.add, character)
        except NameTaken:
            raise Conflict(
                f"you already have a character named {request.name!r}", field="name", rule="unique"
            ) from None
        return character

    async def get(self, id_or_name: str, *, owner: str | None, field: str = "id") -> Character:
        """By id, or by name among `owner`'s; another owner's is not found (None: any owner, for admins)."""
        found = None
        if _ID.match(id_or_name):
            found = await anyio.to_thread.run_sync(self._store.get, id_or_name)
        elif owner is not None:
            found = await anyio.to_thread.run_sync(self._store.find, owner, id_or_name)
        if found is None or (owner is not None and found.owner != owner):
            raise NotFound(f"no character {id_or_name!r}", field=field)
        return found

    async def list(self, *, owner: str | None) -> list[Character]:
        return await anyio.to_thread.run_sync(self._store.all, owner)

    async def update(self, character_id: str, patch: CharacterPatch, *, owner: str | None) -> Character:
        current = await self.get(character_id, owner=owner)
        changes: dict[str, object] = {
            name: value for name in ("name", "description", "defaults") if (value := getattr(patch, name)) is not None
        }
        if patch.references is not None:
            changes["references"] = await self._references(patch.references, "references")
        updated = msgspec.structs.replace(current, **changes, version=current.version + 1, updated_at=time.time())
        try:
            replaced = await anyio.to_thread.run_sync(self._store.replace, updated)
        except NameTaken:
            raise Conflict(f"you already have a character named {patch.name!r}", field="name", rule="unique") from None
        if not replaced:
            raise Conflict(f"character {character_id} changed meanwhile; read it again", field="id", rule="version")
        return updated

    async def delete(self, character_id: str, *, owner: str | None) -> None:
        character = await self.get(character_id, owner=owner)
        await anyio.to_thread.run_sync(self._store.delete, character.id)

    async def apply(self, request: GenerationRequest, owner: str) -> tuple[GenerationRequest, CharacterRef | None]:
        """The request with its character's description woven in and its defaults under the request's own."""
        if request.character is None:
            return request, None
        character = await self.get(request.character, owner=owner, field="character")
        defaults = character.defaults
        own_loras = {lora.name for lora in request.loras}
        merged = msgspec.structs.replace(
            request,
            prompt=f"{character.description}, {request.prompt}",
            style=request.style if request.style is not None else defaults.style,
            loras=[lora for lora in defaults.loras if lora.name not in own_loras] + request.loras,
            negative_prompt=request.negative_prompt or defaults.negative_prompt,
            seed=request.seed if request.seed is not None else defaults.seed,
            references=request.references
            or [ReferenceRequest(image=image, strength=defaults.reference_strength) for image in character.references],
        )
        return merged, CharacterRef(id=character.id, name=character.name, version=character.version)
