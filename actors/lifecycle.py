"""Ending a task: one compare-and-set write that records its event with it, then the event to this process's
subscribers and taps."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from actors.store import TaskStore
from forge.events import AnyTaskEvent, Cancelled, Failed, Succeeded
from forge.tasks import TaskRecord, TaskState


class Hub(Protocol):
    def recorded(self, event: AnyTaskEvent) -> None: ...


async def cancel_task(store: TaskStore, hub: Hub, task: TaskRecord, from_states: Iterable[TaskState]) -> bool:
    event = Cancelled(task_id=task.id)
    ok = await store.transition(
        task.id, attempt=task.attempt, from_states=from_states, to=TaskState.CANCELLED, event=event
    )
    if ok:
        hub.recorded(event)
    return ok


async def fail_task(
    store: TaskStore,
    hub: Hub,
    task: TaskRecord,
    from_states: Iterable[TaskState],
    code: str,
    message: str,
    *,
    to: TaskState = TaskState.FAILED,
) -> bool:
    """End the task `failed` (or `filtered`), with an error code and message."""
    event = Failed(task_id=task.id, code=code, message=message)
    ok = await store.transition(
        task.id,
        attempt=task.attempt,
        from_states=from_states,
        to=to,
        event=event,
        error_code=code,
        error_message=message,
    )
    if ok:
        hub.recorded(event)
    return ok


def final_event(record: TaskRecord) -> AnyTaskEvent | None:
    """The event a task's end state stands for (None while it has not ended)."""
    match record.state:
        case TaskState.SUCCEEDED:
            return Succeeded(task_id=record.id, images=record.images)
        case TaskState.CANCELLED:
            return Cancelled(task_id=record.id)
        case TaskState.FAILED | TaskState.FILTERED:
            return Failed(task_id=record.id, code=record.error_code or record.state, message=record.error_message or "")
    return None
