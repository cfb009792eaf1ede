"""Fan-out of task events to subscribers (WebSockets, MCP progress, UI), with the latest progress kept: the
hub of one box. A fleet's hub (`actors/redis_events.py`) has the same interface over per-task Redis streams."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from forge.events import TERMINAL_EVENTS, AnyTaskEvent, Progress

SUBSCRIBER_BUFFER = 64


class Events(Protocol):
    """What actors and adapters use of a hub, the one-box `EventHub` or the fleet's `RedisEventHub`."""

    def add_tap(self, fn: Callable[[AnyTaskEvent], None]) -> None: ...

    def subscribe(self, task_id: str) -> AbstractAsyncContextManager[MemoryObjectReceiveStream[AnyTaskEvent]]: ...

    def publish(self, event: AnyTaskEvent) -> None: ...

    def recorded(self, event: AnyTaskEvent) -> None: ...

    def latest_progress(self, task_id: str) -> Progress | None: ...

    def forget_progress(self, task_id: str) -> None: ...

    def has_subscribers(self, task_id: str) -> bool: ...

    def statistics(self) -> dict[str, int]: ...


class EventHub:
    def __init__(self) -> None:
        self._subscribers: dict[str, set[MemoryObjectSendStream[AnyTaskEvent]]] = {}
        self._progress: dict[str, Progress] = {}
        self._taps: list[Callable[[AnyTaskEvent], None]] = []

    def add_tap(self, fn: Callable[[AnyTaskEvent], None]) -> None:
        """`fn` sees every event of every task (metrics); it must not block."""
        self._taps.append(fn)

    @asynccontextmanager
    async def subscribe(self, task_id: str) -> AsyncIterator[MemoryObjectReceiveStream[AnyTaskEvent]]:
        """Every event of the task from now on; read the task's state after entering, so nothing is missed."""
        send, receive = anyio.create_memory_object_stream[AnyTaskEvent](SUBSCRIBER_BUFFER)
        self._subscribers.setdefault(task_id, set()).add(send)
        try:
            yield receive
        finally:
            subscribers = self._subscribers.get(task_id, set())
            subscribers.discard(send)
            if not subscribers:
                self._subscribers.pop(task_id, None)
            send.close()
            receive.close()

    def publish(self, event: AnyTaskEvent) -> None:
        """Never blocks: a subscriber too slow for progress events misses some; one that cannot take a
        final event is closed, and reads the task's state instead."""
        final = isinstance(event, TERMINAL_EVENTS)
        for tap in self._taps:
            tap(event)
        if isinstance(event, Progress):
            self._progress[event.task_id] = event
        elif final:
            self._progress.pop(event.task_id, None)
        for send in list(self._subscribers.get(event.task_id, ())):
            try:
                send.send_nowait(event)
            except anyio.WouldBlock:
                if final:
                    send.close()
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass

    def recorded(self, event: AnyTaskEvent) -> None:
        """An event the store recorded with its transition (it keeps none on one box: publish it here)."""
        self.publish(event)

    def latest_progress(self, task_id: str) -> Progress | None:
        return self._progress.get(task_id)

    def forget_progress(self, task_id: str) -> None:
        self._progress.pop(task_id, None)

    def has_subscribers(self, task_id: str) -> bool:
        return bool(self._subscribers.get(task_id))

    def statistics(self) -> dict[str, int]:
        return {
            "subscribers": sum(len(s) for s in self._subscribers.values()),
            "tasks_with_progress": len(self._progress),
        }
