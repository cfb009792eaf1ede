"""What clients see of a task: the JSON shapes of the REST API (and, by reuse, the other adapters)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Annotated

import msgspec
from msgspec import Meta

from actors.encoding import CONTENT_TYPES
from actors.ingress import Live
from engines.animation_poses import DIRECTIONS
from forge.errors import ForgeError
from forge.requests import AnimationRequest, GenerationSpec
from forge.tasks import TaskRecord, TaskState

API = "/v1/generations"


class ErrorView(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    code: str
    message: str
    field: str | None = None
    rule: str | None = None


class ErrorBody(msgspec.Struct, frozen=True):
    error: ErrorView


class ProgressView(msgspec.Struct, frozen=True):
    step: int
    total: int


class Timings(msgspec.Struct, frozen=True, kw_only=True):
    queued_s: float
    running_s: float | None
    total_s: float | None


class ImageLink(msgspec.Struct, frozen=True, kw_only=True):
    index: int
    url: str
    content_type: str
    seed: int
    prompt: Annotated[
        str | None, Meta(description="the prompt this image got, when a task's images differ (variations, grid)")
    ] = None


class Links(msgspec.Struct, frozen=True, kw_only=True):
    self: str
    events: str
    cancel: str


class SpriteSheetLinks(msgspec.Struct, frozen=True, kw_only=True):
    image: str
    atlas: str


class AnimationLinks(msgspec.Struct, frozen=True, kw_only=True):
    directions: Annotated[dict[str, str], Meta(description="direction (s, w, n, e, sw, ...) -> its GIF or WebP")]
    aseprite: Annotated[str, Meta(description="the sheet's atlas as Aseprite's JSON export, a tag per direction")]
    godot: Annotated[str, Meta(description="a Godot 4 SpriteFrames resource: an animation per direction")]


class TaskView(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    state: TaskState
    position: Annotated[int | None, Meta(description="tasks ahead of this one while queued")]
    progress: ProgressView | None
    attempt: int
    request: GenerationSpec
    seeds: list[int]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    timings: Timings
    error: ErrorView | None
    images: list[ImageLink]
    links: Links
    sprite_sheet: SpriteSheetLinks | None = None
    animation: AnimationLinks | None = None
    grid: Annotated[str | None, Meta(description="a prompt matrix's labelled grid image")] = None
    tile_previews: Annotated[list[str], Meta(description="each seamless tile repeated (tile_preview)")] = []
    worker: Annotated[str, Meta(description="the fleet node that runs or ran it (empty on one box)")] = ""


class TaskList(msgspec.Struct, frozen=True, kw_only=True):
    items: list[TaskView]
    next_cursor: str | None


_CURSOR = r"^(?:[0-9]{1,18}|[0-9a-f]{32})$"  # a page's next_cursor, or a task id


class ListQuery(msgspec.Struct, forbid_unknown_fields=True):
    state: TaskState | None = None
    limit: Annotated[int, Meta(ge=1, le=100)] = 20
    cursor: (
        Annotated[
            str,
            Meta(
                pattern=_CURSOR,
                description="next_cursor of the page before, for the page after it",
            ),
        ]
        | None
    ) = None


class ModelSummary(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    is_tiny: bool
    default_size: int
    min_size: int
    max_size: int
    default_steps: int
    default_guidance: float


class InfoView(msgspec.Struct, frozen=True, kw_only=True):
    version: str
    model: ModelSummary
    schedulers: list[str]
    output_formats: list[str]
    engines: Annotated[dict[str, bool], Meta(description="device: loaded and warm")]


class ReadinessView(msgspec.Struct, frozen=True, kw_only=True):
    ready: bool
    accepting: Annotated[bool, Meta(description="false while shutting down")]
    engines: dict[str, bool]
    storage_full: Annotated[bool, Meta(description="accepted work is waiting for disk space to be recorded")]
    store_reachable: Annotated[bool, Meta(description="the task store (Redis in a fleet) answers")] = True


class HealthView(msgspec.Struct, frozen=True):
    status: str


def error_view(exc: ForgeError) -> ErrorBody:
    return ErrorBody(ErrorView(code=exc.code, message=exc.message, field=exc.field, rule=exc.rule))


def image_url(task_id: str, index: int) -> str:
    return f"{API}/{task_id}/images/{index}"


def _when(timestamp: float | None) -> datetime | None:
    return None if timestamp is None else datetime.fromtimestamp(timestamp, UTC)


def _timings(record: TaskRecord) -> Timings:
    now = time.time()
    end = record.finished_at or now
    return Timings(
        queued_s=round((record.started_at or end) - record.created_at, 4),
        running_s=None if record.started_at is None else round(end - record.started_at, 4),
        total_s=None if record.finished_at is None else round(record.finished_at - record.created_at, 4),
    )


def task_view(record: TaskRecord, live: Live) -> TaskView:
    """The task as a client sees it now: its stored row plus queue position and latest progress."""
    position, progress = live.position, live.progress
    base = f"{API}/{record.id}"
    error = None
    if record.error_code:
        error = ErrorView(code=record.error_code, message=record.error_message or "")
    spec = record.spec
    images = [
        ImageLink(
            index=i,
            url=image_url(record.id, i),
            content_type=CONTENT_TYPES[path.rsplit(".", 1)[-1]],
            seed=seed,
            prompt=spec.prompt_of(i) if spec.variants else None,
        )
        for i, (path, seed) in enumerate(zip(record.images, spec.seeds, strict=False))
    ]
    succeeded = record.state is TaskState.SUCCEEDED
    return TaskView(
        id=record.id,
        state=record.state,
        position=position if record.state is TaskState.QUEUED else None,
        progress=ProgressView(progress.step, progress.total)
        if progress and record.state is TaskState.RUNNING
        else None,
        attempt=record.attempt,
        request=record.spec,
        seeds=record.spec.seeds,
        created_at=datetime.fromtimestamp(record.created_at, UTC),
        started_at=_when(record.started_at),
        finished_at=_when(record.finished_at),
        timings=_timings(record),
        error=error,
        images=images,
        links=Links(self=base, events=f"{base}/events", cancel=f"{base}/cancel"),
        sprite_sheet=SpriteSheetLinks(image=f"{base}/sprite-sheet.png", atlas=f"{base}/sprite-sheet.json")
        if record.state is TaskState.SUCCEEDED and record.spec.postprocess and record.spec.postprocess.sprite_sheet
        else None,
        animation=_animation_links(base, spec.animation) if succeeded else None,
        grid=f"{base}/grid.png" if succeeded and spec.grid is not None else None,
        tile_previews=[f"{base}/tile-previews/{i}.png" for i in range(len(images))]
        if succeeded and spec.tile_preview
        else [],
        worker=live.worker or record.worker,
    )


def _animation_links(base: str, animation: AnimationRequest | None) -> AnimationLinks | None:
    if animation is None:
        return None
    return AnimationLinks(
        directions={d: f"{base}/animation/animation-{d}.{animation.format}" for d in DIRECTIONS[animation.directions]},
        aseprite=f"{base}/animation/animation.aseprite.json",
        godot=f"{base}/animation/animation.tres",
    )
