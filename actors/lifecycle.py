"""Ending a task: one committed compare-and-set write, then the matching event to subscribers."""

from __future__ import annotations

from collections.abc import Iterable

from actors.hub import EventHub
from actors.store import Store
from forge.events import Cancelled, Failed
from forge.tasks import TaskRecord, TaskState


async def cancel_task(store: Store, hub: EventHub, task: TaskRecord, from_states: Iterable[TaskState]) -> bool:
    ok = await store.transition(task.id, attempt=task.attempt, from_states=from_states, to=TaskState.CANCELLED)
    if ok:
        hub.publish(Cancelled(task_id=task.id))
    return ok


async def fail_task(
    store: Store,
    hub: EventHub,
    task: TaskRecord,
    from_states: Iterable[TaskState],
    code: str,
    message: str,
    *,
    to: TaskState = TaskState.FAILED,
) -> bool:
    """End the task `failed` (or `filtered`), with an error code and message."""
    ok = await store.transition(
        task.id,
        attempt=task.attempt,
        from_states=from_states,
        to=to,
        error_code=code,
        error_message=message,
    )
    if ok:
        hub.publish(Failed(task_id=task.id, code=code, message=message))
    return ok
