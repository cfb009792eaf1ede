"""Events a subscriber sees for one task (WebSocket, MCP progress, UI). Tagged by `type`."""

from __future__ import annotations

import msgspec


class TaskEvent(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    task_id: str


class Queued(TaskEvent, tag="queued", frozen=True):
    position: int


class Started(TaskEvent, tag="started", frozen=True):
    attempt: int
    device: str
    batch: int = 1  # tasks denoised together in this run (dynamic batching), this one included
    worker: str = ""  # the node that runs it (a fleet's worker; empty on one box)


class Progress(TaskEvent, tag="progress", frozen=True):
    step: int
    total: int
    preview_jpeg_b64: str | None = None


class Postprocessing(TaskEvent, tag="postprocessing", frozen=True):
    """Entered post-processing; then, per image and step, which step starts (`step` of `total`)."""

    stage: str | None = None
    image: int | None = None
    step: int = 0
    total: int = 0


class Succeeded(TaskEvent, tag="succeeded", frozen=True):
    images: list[str]


class Failed(TaskEvent, tag="failed", frozen=True):
    code: str
    message: str


class Cancelled(TaskEvent, tag="cancelled", frozen=True):
    pass


AnyTaskEvent = Queued | Started | Progress | Postprocessing | Succeeded | Failed | Cancelled
TERMINAL_EVENTS = (Succeeded, Failed, Cancelled)
