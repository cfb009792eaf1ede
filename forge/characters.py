"""A character library: a named character whose description, reference images and defaults every interface
can reuse, so a game's hero looks like the same hero in every generation."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from forge.errors import InvalidRequest
from forge.requests import (
    MAX_VIEWS,
    AnimationRequest,
    GenerationRequest,
    ImageInput,
    LoraRequest,
    ModelId,
    Name,
    PostprocessRequest,
    SpriteSheetRequest,
    ViewRequest,
)
from forge.requests import CharacterUsed as CharacterRef

__all__ = ["CharacterRef"]

MAX_CHARACTER_REFERENCES = 4  # reference images a character keeps
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
        list[ImageInput],
        Meta(max_length=MAX_CHARACTER_REFERENCES, description="reference images: upload ids or base64"),
    ] = []
    defaults: CharacterDefaults = CharacterDefaults()


class CharacterPatch(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Fields to change; each change makes a new version."""

    name: Name | None = None
    description: Annotated[str, Meta(min_length=1, max_length=2000)] | None = None
    references: Annotated[list[ImageInput], Meta(max_length=MAX_CHARACTER_REFERENCES)] | None = None
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


SheetKind = Literal["turnaround", "expressions", "poses"]
EXPRESSIONS = ("neutral", "happy", "angry", "sad", "surprised")
# Front, three-quarter, side and back, each with its pose template and the words that ask for that view.
TURNAROUND_VIEWS = (
    ViewRequest(label="front", prompt="front view", pose="front"),
    ViewRequest(label="three-quarter", prompt="three-quarter view", pose="three-quarter"),
    ViewRequest(label="side", prompt="side view, profile", pose="left"),
    ViewRequest(label="back", prompt="back view, from behind", pose="back"),
)


class CharacterSheetRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Several views of one character from one seed, as one task, packed into a sprite sheet too."""

    kind: Annotated[
        SheetKind,
        Meta(description="turnaround: front, three-quarter, side, back; expressions: one face each; poses: templates"),
    ] = "turnaround"
    expressions: Annotated[
        list[Annotated[str, Meta(min_length=1, max_length=40, pattern=r"^[A-Za-z][A-Za-z -]*$")]],
        Meta(min_length=1, max_length=MAX_VIEWS),
    ] = msgspec.field(default_factory=lambda: list(EXPRESSIONS))
    poses: Annotated[list[Name], Meta(max_length=MAX_VIEWS, description="kind poses: pose templates")] = []
    prompt: Annotated[str, Meta(max_length=2000, description="added to every view")] = "full body"
    style: Name | Annotated[list[Name], Meta(max_length=8)] | None = None
    model: ModelId | None = None
    width: Annotated[int, Meta(ge=8, le=4096, multiple_of=8)] | None = None
    height: Annotated[int, Meta(ge=8, le=4096, multiple_of=8)] | None = None
    steps: Annotated[int, Meta(ge=1, le=150)] | None = None
    seed: Annotated[int, Meta(ge=0, le=2**32 - 1)] | None = None
    columns: (
        Annotated[int, Meta(ge=1, le=64, description="sprite sheet columns; all in one row when absent")] | None
    ) = None

    def check(self) -> None:
        """What its schema cannot say: a poses sheet names its poses."""
        if self.kind == "poses" and not self.poses:
            raise InvalidRequest("a poses sheet needs poses (GET /v1/poses)", field="poses", rule="required")


def sheet_views(sheet: CharacterSheetRequest) -> list[ViewRequest]:
    if sheet.kind == "turnaround":
        return list(TURNAROUND_VIEWS)
    if sheet.kind == "expressions":
        return [
            ViewRequest(label=expression.replace(" ", "-"), prompt=f"{expression} expression")
            for expression in sheet.expressions
        ]
    return [ViewRequest(label=pose, prompt=f"{pose} pose", pose=pose) for pose in sheet.poses]


def sheet_generation(character_id: str, sheet: CharacterSheetRequest) -> GenerationRequest:
    """The generation a sheet is: the character, its views, one seed, and a sprite sheet of the images."""
    views = sheet_views(sheet)
    return GenerationRequest(
        prompt=sheet.prompt or "full body",
        character=character_id,
        views=views,
        style=sheet.style,
        model=sheet.model,
        width=sheet.width,
        height=sheet.height,
        steps=sheet.steps,
        seed=sheet.seed,
        postprocess=PostprocessRequest(sprite_sheet=SpriteSheetRequest(columns=sheet.columns or len(views) or 1)),
    )


class CharacterAnimationRequest(AnimationRequest, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """An animation cycle of the character (its description and references in every frame), as one task."""

    prompt: Annotated[str, Meta(max_length=2000, description="added to every frame")] = "full body"
    negative_prompt: Annotated[str, Meta(max_length=2000)] = ""
    style: Name | Annotated[list[Name], Meta(max_length=8)] | None = None
    model: ModelId | None = None
    width: Annotated[int, Meta(ge=8, le=4096, multiple_of=8)] | None = None
    height: Annotated[int, Meta(ge=8, le=4096, multiple_of=8)] | None = None
    steps: Annotated[int, Meta(ge=1, le=150)] | None = None
    seed: Annotated[int, Meta(ge=0, le=2**32 - 1)] | None = None
    postprocess: (
        Annotated[PostprocessRequest, Meta(description="run on every frame (pixel art: one palette)")] | None
    ) = None


def animation_generation(character_id: str, request: CharacterAnimationRequest) -> GenerationRequest:
    """The generation an animation of the character is."""
    animation = AnimationRequest(**{name: getattr(request, name) for name in AnimationRequest.__struct_fields__})
    return GenerationRequest(
        prompt=request.prompt or "full body",
        negative_prompt=request.negative_prompt,
        character=character_id,
        animation=animation,
        style=request.style,
        model=request.model,
        width=request.width,
        height=request.height,
        steps=request.steps,
        seed=request.seed,
        postprocess=request.postprocess,
    )
