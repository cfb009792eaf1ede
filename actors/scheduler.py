"""The scheduler: owns the queue, hands tasks to idle engines, and cancels exactly the task named."""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import assert_never

import anyio
import structlog
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from actors.hub import EventHub
from actors.lifecycle import cancel_task
from actors.store import Store
from forge.engine import CancelFlag
from forge.events import Queued, Started
from forge.messages import Cancel, Dispatch, EngineIdle, EngineReady, SchedulerInbox, Submit
from forge.tasks import TaskRecord, TaskState

log = logging.getLogger(__name__)


@dataclass(order=True, frozen=True)
class _Entry:
    key: tuple[int, int]  # (-priority, seq): higher priority first, then first come first served
    task: TaskRecord = field(compare=False)


def _key(task: TaskRecord) -> tuple[int, int]:
    return (-task.spec.priority, task.seq)


@dataclass(frozen=True)
class _Running:
    device: str
    task: TaskRecord
    cancel: CancelFlag


@dataclass(frozen=True)
class SchedulerStatistics:
    queued: int
    running: int
    engines_ready: int
    engines_idle: int
    dispatching: bool


class Scheduler:
    def __init__(
        self,
        store: Store,
        hub: EventHub,
        inbox: MemoryObjectReceiveStream[SchedulerInbox],
        engines: dict[str, MemoryObjectSendStream[Dispatch]],
        on_enqueue: Callable[[TaskRecord], None] | None = None,
    ) -> None:
        self._on_enqueue = on_enqueue
        self._store = store
        self._hub = hub
        self._inbox = inbox
        self._engines = engines
        self._queue: list[_Entry] = []
        self._idle: list[str] = []
        self._ready: set[str] = set()
        self._running: dict[str, _Running] = {}
        self._dispatching = True
        self._running_changed = anyio.Event()
        self._request_ids: dict[str, str] = {}  # task id -> the request that created it (this process only)

    async def run(
        self, recovered: list[TaskRecord], *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        for task in recovered:
            self._enqueue(task)
        if recovered:
            log.info("resuming %d queued task(s) from the store", len(recovered))
        task_status.started()
        async with self._inbox:
            async for msg in self._inbox:
                match msg:
                    case Submit(task=task, request_id=request_id):
                        if request_id:
                            self._request_ids[task.id] = request_id
                        self._enqueue(task)
                    case Cancel(task_id=task_id):
                        await self._cancel(task_id)
                    case EngineReady(device=device):
                        self._ready.add(device)
                        self._idle.append(device)
                    case EngineIdle(device=device, task_id=task_id):
                        self._running.pop(task_id, None)
                        self._running_changed.set()
                        self._idle.append(device)
                    case _:
                        assert_never(msg)
                await self._dispatch()

    # -- introspection (called from other actors on the same loop) --

    def in_flight(self, owner: str) -> int:
        """The owner's tasks queued here or running."""
        queued = sum(1 for entry in self._queue if entry.task.owner == owner)
        return queued + sum(1 for running in self._running.values() if running.task.owner == owner)

    def position(self, task: TaskRecord) -> int:
        """How many queued tasks run before this one (also right for a task whose Submit is still in flight)."""
        return bisect.bisect_left(self._queue, _Entry(_key(task), task))

    def _index(self, task_id: str) -> int | None:
        return next((i for i, entry in enumerate(self._queue) if entry.task.id == task_id), None)

    def device_of(self, task_id: str) -> str:
        running = self._running.get(task_id)
        return running.device if running else ""

    def is_ready(self) -> bool:
        return bool(self._engines) and self._ready == set(self._engines)

    def statistics(self) -> SchedulerStatistics:
        return SchedulerStatistics(
            queued=len(self._queue),
            running=len(self._running),
            engines_ready=len(self._ready),
            engines_idle=len(self._idle),
            dispatching=self._dispatching,
        )

    # -- shutdown --

    def stop_dispatching(self) -> None:
        self._dispatching = False

    async def wait_no_running(self) -> None:
        while self._running:
            self._running_changed = anyio.Event()
            await self._running_changed.wait()

    def interrupt_running(self, reason: str) -> None:
        for running in self._running.values():
            running.cancel.set(reason)

    # -- internals --

    def _enqueue(self, task: TaskRecord) -> None:
        if self._on_enqueue is not None:
            self._on_enqueue(task)
        bisect.insort(self._queue, _Entry(_key(task), task))
        self._publish_positions()

    async def _cancel(self, task_id: str) -> None:
        index = self._index(task_id)
        if index is not None:
            task = self._queue.pop(index).task
            await cancel_task(self._store, self._hub, task, [TaskState.QUEUED])
            self._publish_positions()
        elif task_id in self._running:
            self._running[task_id].cancel.set("cancelled")  # the engine ends it at its next step
        else:
            record = await self._store.get(task_id)
            if record is not None and record.state is TaskState.POSTPROCESSING:
                await cancel_task(self._store, self._hub, record, [TaskState.POSTPROCESSING])

    async def _dispatch(self) -> None:
        dispatched = False
        while self._dispatching and self._queue and self._idle:
            task = self._queue.pop(0).task
            device = self._idle.pop(0)
            started = await self._store.transition(
                task.id,
                attempt=task.attempt,
                from_states=[TaskState.QUEUED],
                to=TaskState.RUNNING,
                started_at=time.time(),
            )
            if not started:  # ended elsewhere since it was queued
                self._idle.insert(0, device)
                continue
            flag = CancelFlag()
            self._running[task.id] = _Running(device, task, flag)
            self._hub.publish(Started(task_id=task.id, attempt=task.attempt, device=device))
            request_id = self._request_ids.pop(task.id, "")
            with structlog.contextvars.bound_contextvars(task_id=task.id, request_id=request_id):
                log.info("dispatched to %s (attempt %d)", device, task.attempt)
            await self._engines[device].send(Dispatch(task=task, cancel=flag, request_id=request_id))
            dispatched = True
        if dispatched:
            self._publish_positions()

    def _publish_positions(self) -> None:
        for index, entry in enumerate(self._queue):
            if self._hub.has_subscribers(entry.task.id):
                self._hub.publish(Queued(task_id=entry.task.id, position=index))
