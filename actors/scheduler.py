"""The scheduler: hands batches of compatible tasks to idle engines and cancels exactly the task named.

On one box it owns the queue (in memory, rebuilt from the store at start), groups compatible tasks into
batches and prefers an engine that holds the model. In a fleet the queue is the store's (`RedisStore`): an
idle engine claims its next batch from it, offering the models it holds, and is woken by `Wake`.
"""

from __future__ import annotations

import bisect
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, assert_never

import anyio
import structlog
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from actors.hub import Events
from actors.lifecycle import cancel_task
from actors.store import TaskStore
from forge.batching import NO_BATCHING, BatchKey, BatchPolicy, batch_key, may_join, next_batch
from forge.engine import CancelFlag
from forge.errors import ForgeError
from forge.events import Queued, Started
from forge.messages import (
    Assignment,
    Cancel,
    Dispatch,
    EngineIdle,
    EngineReady,
    SchedulerInbox,
    Submit,
    TaskLeft,
    Wake,
)
from forge.tasks import TaskRecord, TaskState

log = logging.getLogger(__name__)


@dataclass(order=True, frozen=True)
class _Entry:
    key: tuple[int, int]  # (-priority, seq): higher priority first, then first come first served
    task: TaskRecord = field(compare=False)
    queued_at: float = field(compare=False, default=0.0)  # monotonic, in this process


def _key(task: TaskRecord) -> tuple[int, int]:
    return (-task.spec.priority, task.seq)


@dataclass(frozen=True)
class _Running:
    device: str
    task: TaskRecord
    cancel: CancelFlag
    batch_size: int


@dataclass(frozen=True)
class SchedulerStatistics:
    queued: int
    running: int
    engines_ready: int
    engines_idle: int
    dispatching: bool


class FleetQueue(Protocol):
    """The store's queue, for a fleet's worker (see `RedisStore.claim`)."""

    async def claim(
        self,
        worker: str,
        device: str,
        max_images: int,
        holds: Sequence[str],
        affinity_s: float,
        *,
        step_level: bool = False,
        joining: BatchKey | None = None,
    ) -> list[str]: ...

    async def get(self, task_id: str) -> TaskRecord | None: ...


@dataclass(frozen=True)
class FleetSettings:
    queue: FleetQueue
    worker: str
    models_held: Callable[[str], Sequence[str]]  # device -> the models it holds
    affinity_s: float = 10.0
    poll_s: float = 1.0  # wakes come by pub/sub, which may drop one: look again this often anyway


class Scheduler:
    def __init__(
        self,
        store: TaskStore,
        hub: Events,
        inbox: MemoryObjectReceiveStream[SchedulerInbox],
        engines: dict[str, MemoryObjectSendStream[Dispatch]],
        on_take: Callable[[TaskRecord], None] | None = None,
        *,
        batching: BatchPolicy = NO_BATCHING,
        holds_model: Callable[[str, str], bool] = lambda device, model_id: False,
        fleet: FleetSettings | None = None,
    ) -> None:
        self._fleet = fleet
        self._on_take = on_take
        self._batching = batching
        self._holds_model = holds_model
        self._store = store
        self._hub = hub
        self._inbox = inbox
        self._engines = engines
        self._queue: list[_Entry] = []
        self._idle: list[str] = []
        self._ready: set[str] = set()
        self._running: dict[str, _Running] = {}
        self._open: dict[str, BatchKey] = {}  # device -> the key of its running step-level batch
        self._dispatching = True
        self._running_changed = anyio.Event()
        self._request_ids: dict[str, str] = {}  # task id -> the request that created it (this process only)
        self._window_closes: float | None = None  # when a part-filled batch that waits for company must go

    async def run(
        self, recovered: list[TaskRecord], *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        for task in recovered:
            self._enqueue(task)
        if recovered:
            log.info("resuming %d queued task(s) from the store", len(recovered))
        task_status.started()
        async with self._inbox:
            while True:
                msg: SchedulerInbox | None = None
                wait = math.inf if self._window_closes is None else self._window_closes - time.monotonic()
                if self._fleet is not None and (self._idle or self._open):
                    wait = min(wait, self._fleet.poll_s)
                with anyio.move_on_after(max(wait, 0)):  # a batch window closing is the only timed event
                    try:
                        msg = await self._inbox.receive()
                    except anyio.EndOfStream:
                        return
                if msg is not None:
                    await self._handle(msg)
                await self._dispatch()

    async def _handle(self, msg: SchedulerInbox) -> None:
        match msg:
            case Submit(task=task, request_id=request_id):
                if request_id:
                    self._request_ids[task.id] = request_id
                self._enqueue(task)
            case Cancel(task_id=task_id):
                await self._cancel(task_id)
            case Wake():
                pass  # new work in the fleet's queue: dispatch looks
            case EngineReady(device=device):
                self._ready.add(device)
                self._idle.append(device)
            case EngineIdle(device=device, task_ids=task_ids):
                for task_id in task_ids:
                    self._running.pop(task_id, None)
                self._running_changed.set()
                # A task sent to join as the batch ended keeps the engine busy: it runs it as a new batch.
                if not any(running.device == device for running in self._running.values()):
                    self._open.pop(device, None)
                    self._idle.append(device)
            case TaskLeft(task_id=task_id):
                self._running.pop(task_id, None)
                self._running_changed.set()
            case _:
                assert_never(msg)

    # -- introspection (called from other actors on the same loop) --

    def position(self, task: TaskRecord) -> int:
        """How many queued tasks run before this one (also right for a task whose Submit is still in flight)."""
        return bisect.bisect_left(self._queue, _Entry(_key(task), task))

    def _index(self, task_id: str) -> int | None:
        return next((i for i, entry in enumerate(self._queue) if entry.task.id == task_id), None)

    def placement(self, task_id: str) -> tuple[str, int]:
        """Where a running task runs: its device and the number of tasks in its batch ("", 0 when not running)."""
        running = self._running.get(task_id)
        return (running.device, running.batch_size) if running else ("", 0)

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

    def interrupt(self, task_id: str, reason: str) -> None:
        """Stop one running task at its next step, for `reason` (e.g. its claim was lost to the reaper)."""
        if (running := self._running.get(task_id)) is not None:
            running.cancel.set(reason)

    def running_tasks(self) -> list[tuple[TaskRecord, str]]:
        """Each task an engine runs now, with its device."""
        return [(running.task, running.device) for running in self._running.values()]

    # -- internals --

    def _enqueue(self, task: TaskRecord) -> None:
        if self._on_take is not None:
            self._on_take(task)
        bisect.insort(self._queue, _Entry(_key(task), task, time.monotonic()))
        self._publish_positions()

    async def _cancel(self, task_id: str) -> None:
        index = self._index(task_id)
        if index is not None:
            task = self._queue.pop(index).task
            await cancel_task(self._store, self._hub, task, [TaskState.QUEUED])
            self._publish_positions()
        elif task_id in self._running:
            running = self._running[task_id]
            running.cancel.set("cancelled")  # the engine ends it at its next step...
            if running.batch_size > 1:  # ...or, while its batch goes on for the others, it ends now
                await cancel_task(self._store, self._hub, running.task, [TaskState.RUNNING])
        else:
            record = await self._store.get(task_id)
            if record is not None and record.state is TaskState.POSTPROCESSING:
                await cancel_task(self._store, self._hub, record, [TaskState.POSTPROCESSING])

    async def _dispatch(self) -> None:
        if self._fleet is not None:
            await self._claim(self._fleet)
            return
        self._window_closes = None
        dispatched = False
        while self._dispatching and self._queue and self._idle:
            batch = self._next_batch()
            if batch is None:
                break
            for entry in batch:
                self._queue.remove(entry)
            dispatched = await self._start(batch) or dispatched
        while self._dispatching and self._queue and (device := self._joinable(self._queue[0])) is not None:
            dispatched = await self._start([self._queue.pop(0)], device) or dispatched
        if dispatched:
            self._publish_positions()

    def _joinable(self, head: _Entry) -> str | None:
        """A device whose running step-level batch the head of the queue joins now (see `may_join`)."""
        for device, key in self._open.items():
            if may_join(head.task.spec, key, self._images_on(device), self._batching):
                return device
        return None

    def _next_batch(self) -> list[_Entry] | None:
        """The head task and the queued tasks that can share its batch, in queue order, up to the image limit;
        None while a part-filled batch waits for company (only when nothing else is queued, and at most
        `max_wait_s` after its oldest task arrived)."""
        head = self._queue[0]
        chosen = next_batch([entry.task.spec for entry in self._queue], self._batching)
        batch = [self._queue[index] for index in chosen]
        key = batch_key(head.task.spec, self._batching.step_level)
        images, limit = sum(entry.task.spec.num_images for entry in batch), self._batching.max_images
        could_grow = key is not None and images < limit and len(batch) == len(self._queue)
        closes = head.queued_at + self._batching.max_wait_s
        if could_grow and time.monotonic() < closes:
            self._window_closes = closes
            return None
        return batch

    async def _claim(self, fleet: FleetSettings) -> None:
        """Each idle engine claims its next batch from the fleet's queue, until the queue has none; then each
        running step-level batch with room claims the tasks that join it at its next step."""
        while self._dispatching and self._idle:
            device = self._idle[0]
            assignments = await self._claim_for(fleet, device, self._batching.max_images)
            if assignments is None:
                return
            if assignments:
                self._idle.pop(0)
                await self._hand_over(device, assignments, fleet.worker)
        for device, key in list(self._open.items()):
            room = self._batching.max_images - self._images_on(device)
            if not (self._dispatching and self._batching.joins and room > 0):
                continue
            if assignments := await self._claim_for(fleet, device, room, joining=key):
                await self._hand_over(device, assignments, fleet.worker)

    async def _claim_for(
        self, fleet: FleetSettings, device: str, max_images: int, joining: BatchKey | None = None
    ) -> list[Assignment] | None:
        """The tasks this device claims now; None when there are none (or the store is out of reach)."""
        try:
            ids = await fleet.queue.claim(
                fleet.worker,
                device,
                max_images,
                fleet.models_held(device),
                fleet.affinity_s,
                step_level=self._batching.step_level,
                joining=joining,
            )
            records = [await fleet.queue.get(task_id) for task_id in ids]
        except ForgeError as exc:  # the store is out of reach: look again at the next wake or poll
            log.warning("cannot claim work: %s", exc)
            return None
        if not ids:
            return None
        # Claimed rows that are gone (deleted by hand) are skipped.
        claimed = [record for record in records if record is not None]
        if self._on_take is not None:
            for record in claimed:
                self._on_take(record)
        return [Assignment(task=record, cancel=CancelFlag(), request_id="") for record in claimed]

    async def _start(self, batch: list[_Entry], joining: str | None = None) -> bool:
        """Mark the batch's tasks running and send them to an idle engine (or to `joining`'s running step-level
        batch); False when none could start."""
        device = joining or self._pick_device(batch[0].task.spec.model)
        assignments = []
        for entry in batch:
            task = entry.task
            started = await self._store.transition(
                task.id,
                attempt=task.attempt,
                from_states=[TaskState.QUEUED],
                to=TaskState.RUNNING,
                started_at=time.time(),
            )
            if not started:  # ended elsewhere since it was queued
                continue
            request_id = self._request_ids.pop(task.id, "")
            assignments.append(Assignment(task=task, cancel=CancelFlag(), request_id=request_id))
        if not assignments:
            if joining is None:
                self._idle.insert(0, device)
            return False
        await self._hand_over(device, assignments)
        return True

    async def _hand_over(self, device: str, assignments: list[Assignment], worker: str = "") -> None:
        """Record the tasks as running on `device` and send them to its engine. `worker`: they were claimed
        from the fleet's queue, which wrote their start already."""
        # A step-level batch stays open for joiners (a task that always runs alone has no key: no batch to join).
        step_key = batch_key(assignments[0].task.spec, step_level=True) if self._batching.step_level else None
        if step_key is not None:
            self._open.setdefault(device, step_key)
        size = len(assignments)
        for assignment in assignments:
            task = assignment.task
            self._running[task.id] = _Running(device, task, assignment.cancel, size)
            started = Started(task_id=task.id, attempt=task.attempt, device=device, batch=size, worker=worker)
            if worker:
                self._hub.recorded(started)
            else:
                self._hub.publish(started)
            with structlog.contextvars.bound_contextvars(task_id=task.id, request_id=assignment.request_id):
                verb = "claimed on" if worker else "dispatched to"
                log.info("%s %s (attempt %d, batch of %d)", verb, device, task.attempt, size)
        await self._engines[device].send(Dispatch(batch=assignments, step_level=step_key is not None))

    def _images_on(self, device: str) -> int:
        """The images of the tasks running on `device` (its step-level batch's, when it has one open)."""
        return sum(running.task.spec.num_images for running in self._running.values() if running.device == device)

    def _pick_device(self, model_id: str) -> str:
        """An idle engine that already holds the model, else the one idle longest."""
        index = next((i for i, device in enumerate(self._idle) if self._holds_model(device, model_id)), 0)
        return self._idle.pop(index)

    def _publish_positions(self) -> None:
        for index, entry in enumerate(self._queue):
            if self._hub.has_subscribers(entry.task.id):
                self._hub.publish(Queued(task_id=entry.task.id, position=index))
