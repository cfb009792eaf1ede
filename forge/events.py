"""Events a subscriber sees for one task (WebSocket, MCP progress, UI). Tagged by `type`."""

from __future__ import annotations

import msgspec


class TaskEvent(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    task_id: str


class Queued(TaskEvent, tag="queued"):
    position: int


class Started(TaskEvent, tag="started"):
    attempt: int
    device: str


class Progress(TaskEvent, tag="progress"):
    step: int
    total: int
    preview_jpeg_b64: str | None = None


class Postprocessing(TaskEvent, tag="postprocessing"):
    pass


class Succeeded(TaskEvent, tag="succeeded"):
    images: list[str]


class Failed(TaskEvent, tag="failed"):
    code: str
    message: str


class Cancelled(TaskEvent, tag="cancelled"):
    pass


AnyTaskEvent = Queued | Started | Progress | Postprocessing | Succeeded | Failed | Cancelled
TERMINAL_EVENTS = (Succeeded, Failed, Cancelled)
