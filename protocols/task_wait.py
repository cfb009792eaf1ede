"""For adapters whose clients block on one request until the images exist (AUTOMATIC1111, OpenAI Images)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio
import anyio.to_thread

from actors.files import Files
from actors.hub import Events
from actors.ingress import Ingress
from forge.errors import ForgeError
from forge.events import TERMINAL_EVENTS, Progress
from forge.tasks import TaskRecord

OnProgress = Callable[[Progress], Awaitable[None]]


class GenerationFailed(ForgeError):
    """A task an adapter waited for ended without images; `code` is the task's own error code."""

    def __init__(self, record: TaskRecord, status: int = 500) -> None:
        super().__init__(record.error_message or f"the generation ended {record.state}")
        self.code = record.error_code or str(record.state)
        self.status = status


async def until_finished(
    ingress: Ingress, hub: Events, record: TaskRecord, on_progress: OnProgress | None = None
) -> TaskRecord:
    """The task once it has ended, however long that takes (subscribed first, then the state read: no
    event is missed). `on_progress` sees each step, with a preview while someone watches."""
    async with hub.subscribe(record.id) as events:
        current = await ingress.get(record.id, owner=record.owner)
        if not current.state.is_terminal:
            async for event in events:
                if isinstance(event, Progress) and on_progress is not None:
                    await on_progress(event)
                elif isinstance(event, TERMINAL_EVENTS):
                    break
    return await ingress.get(record.id, owner=record.owner)


async def image_bytes(results: Files, record: TaskRecord) -> list[bytes]:
    """The task's encoded images, as stored."""

    def read() -> list[bytes]:
        found = [results.read(name) for name in record.images]
        return [data for data in found if data is not None]

    return await anyio.to_thread.run_sync(read)
