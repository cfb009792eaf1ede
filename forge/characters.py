"""A character library: a named character whose description, reference images and defaults every interface
can reuse, so a game's hero looks like the same hero in every generation."""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

from forge.requests import CharacterUsed as CharacterRef
from forge.requests import ImageInput, LoraRequest, Name

__all__ = ["CharacterRef"]

MAX_REFERENCES = 4
CHARACTER_ID = r"^ch_[0-9a-f]{32}$"


class CharacterDefaults(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """Used by a generation of the character where the request leaves the field out."""

    style: Name | Annotated[list[Name], Meta(max_length=8)] | None = None
    loras: list[LoraRequest] = []
    negative_prompt: Annotated[str, Meta(max_length=2000)] = ""
    seed: Annotated[int, Meta(ge=0, le=2**32 - 1)] | None = None
    reference_strength: Annotated[float, Meta(ge=0, le=1)] = 0.8


class CharacterCreate(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: Annotated[Name, Meta(description="unique among the owner's characters; a request may name it")]
    description: Annotated[
        str, Meta(min_length=1, max_length=2000, description="prompt text woven into every generation of it")
    ]
    references: Annotated[
        list[ImageInput], Meta(max_length=MAX_REFERENCES, description="reference images: upload ids or base64")
    ] = []
    defaults: CharacterDefaults = CharacterDefaults()


class CharacterPatch(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Fields to change; each change makes a new version."""

    name: Name | None = None
    description: Annotated[str, Meta(min_length=1, max_length=2000)] | None = None
    references: Annotated[list[ImageInput], Meta(max_length=MAX_REFERENCES)] | None = None
    defaults: CharacterDefaults | None = None


class Character(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    owner: str
    name: str
    description: str
    references: list[str]  # upload ids
    defaults: CharacterDefaults
    version: int
    created_at: float
    updated_at: float


class CharacterList(msgspec.Struct, frozen=True):
    items: list[Character]
