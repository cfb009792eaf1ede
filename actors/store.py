"""The store: where every task's row, the queue's order and the admission counters live. One interface, two
backends: SQLite (one box, `actors/sqlite_store.py`) and Redis (a fleet, `actors/redis_store.py`). Actors talk
to `TaskStore` and never know which one they have; `tests/test_store.py` runs the same contract on both.

Every transition is a compare-and-set on (state, attempt): a write from an older attempt, or from an actor
that lost a race with cancel, changes nothing and reports False.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec

from actors.disk_space import DiskSpace
from forge.auth import Plan
from forge.events import AnyTaskEvent
from forge.requests import GenerationSpec
from forge.tasks import TaskRecord, TaskState

WORKER_LOST = "worker_lost"


class Recovery(msgspec.Struct, frozen=True):
    requeued: list[TaskRecord]
    retried: int
    failed: int


class IdempotencyConflict(Exception):
    """The same owner's Idempotency-Key already names a task (`task_id`), made from `request_hash`."""

    def __init__(self, task_id: str, request_hash: str | None) -> None:
        super().__init__(task_id)
        self.task_id = task_id
        self.request_hash = request_hash


@dataclass(frozen=True)
class Admission:
    """What a submission must fit, checked in the same atomic step as the insert: the queue's length, and
    the owner's plan (submissions per window, tasks queued or running at once). `plan` None: no limits."""

    max_queue: int
    plan_name: str = ""
    plan: Plan | None = None


class TaskStore(Protocol):
    disk: DiskSpace  # transitions wait out a full disk (SQLite); Redis writes wait out an outage the same way

    async def insert(
        self,
        *,
        owner: str,
        spec: GenerationSpec,
        admission: Admission,
        idempotency_key: str | None = None,
        request_hash: str | None = None,
    ) -> TaskRecord:
        """Commit a new `queued` task (and its queue entry) if it is admitted. Raises IdempotencyConflict when
        the key is taken, RateLimited or ServiceUnavailable when it does not fit."""
        ...

    async def get(self, task_id: str) -> TaskRecord | None: ...

    async def find_idempotent(self, owner: str, key: str) -> tuple[TaskRecord, str | None] | None: ...

    async def transition(
        self,
        task_id: str,
        *,
        attempt: int,
        from_states: Iterable[TaskState],
        to: TaskState,
        event: AnyTaskEvent | None = None,
        **fields: Any,
    ) -> bool:
        """Move a task to `to` only if it is still in one of `from_states` at `attempt`. `event` is recorded in
        the same step where the backend keeps events (Redis); to QUEUED puts the task back in the queue."""
        ...

    async def list(
        self,
        *,
        owner: str | None = None,
        state: TaskState | None = None,
        limit: int = 20,
        before_seq: int | None = None,
        before_id: str | None = None,
    ) -> list[TaskRecord]:
        """Newest first; for the next page pass the last seen `seq` as `before_seq`, or its id as `before_id`."""
        ...

    async def count_by_state(self) -> dict[TaskState, int]: ...

    async def recover(self, max_attempts: int) -> Recovery:
        """At start: tasks that were mid-flight when this box died run again, up to `max_attempts` (SQLite; a
        fleet's reaper does this continuously)."""
        ...
