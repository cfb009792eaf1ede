"""A fleet's event hub: every task's events in its own Redis stream (`forge:ev:<id>`), so a subscriber on any
node follows a task running on any worker. Same interface as the one-box hub (`actors/hub.py`).

Published events (progress, previews, post-processing steps) are written in order by one writer task, and
wait out an outage; events of transitions were already written by the store's script (`recorded`). A
subscriber reads its task's stream from the last entry that existed when it subscribed, so with the state
read after subscribing it misses nothing; and since a terminal event must never be missed, a subscriber
that hears nothing for a while reads the task's state and, if it has ended, delivers its final event itself.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import anyio
import msgspec
import redis.asyncio as aioredis
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from actors.hub import SUBSCRIBER_BUFFER
from actors.lifecycle import final_event
from actors.redis_store import P, RedisStore, client_options, is_outage
from forge.events import TERMINAL_EVENTS, AnyTaskEvent, Progress, Queued

log = logging.getLogger(__name__)

BLOCK_MS = 1000
EVENTS_KEPT = 512
_decode = msgspec.json.Decoder(AnyTaskEvent).decode
_encode = msgspec.json.Encoder().encode


class RedisEventHub:
    def __init__(self, store: RedisStore) -> None:
        self._store = store
        self._taps: list[Callable[[AnyTaskEvent], None]] = []
        self._outbox_send, self._outbox = anyio.create_memory_object_stream[AnyTaskEvent](math.inf)
        # Blocking reads get connections of their own: cancelling one mid-read closes its connection.
        self._reader = aioredis.Redis.from_url(
            store.url, **(client_options() | {"socket_timeout": 10 + BLOCK_MS / 1000})
        )
        self._tg: anyio.abc.TaskGroup | None = None
        self._subscribers = 0

    def add_tap(self, fn: Callable[[AnyTaskEvent], None]) -> None:
        self._taps.append(fn)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                task_status.started()
                await self._write_events()
        finally:
            self._outbox_send.close()
            with anyio.CancelScope(shield=True):
                await self._reader.aclose()

    # -- publishing --

    def publish(self, event: AnyTaskEvent) -> None:
        for tap in self._taps:
            tap(event)
        self._outbox_send.send_nowait(event)

    def recorded(self, event: AnyTaskEvent) -> None:
        for tap in self._taps:
            tap(event)

    async def _write_events(self) -> None:
        async with self._outbox:
            async for event in self._outbox:
                batch = [event]
                while len(batch) < 64:
                    try:
                        batch.append(self._outbox.receive_nowait())
                    except anyio.WouldBlock:
                        break
                await self._store.disk.write(f"{len(batch)} event(s)", partial(self._append, batch))

    async def _append(self, events: list[AnyTaskEvent]) -> None:
        async with self._store.client.pipeline(transaction=False) as pipe:
            for event in events:
                encoded = _encode(event)
                pipe.xadd(f"{P}ev:{event.task_id}", {"e": encoded}, maxlen=EVENTS_KEPT, approximate=True)
                if isinstance(event, Progress):  # the latest progress, for task views on any node
                    pipe.hset(
                        f"{P}task:{event.task_id}",
                        "progress",
                        _encode(msgspec.structs.replace(event, preview_jpeg_b64=None)),
                    )
            await pipe.execute()

    # -- subscribing --

    @asynccontextmanager
    async def subscribe(self, task_id: str) -> AsyncIterator[MemoryObjectReceiveStream[AnyTaskEvent]]:
        assert self._tg is not None, "the hub is not running"
        last = await self._store.call(self._store.client.xrevrange, f"{P}ev:{task_id}", "+", "-", 1)
        send, receive = anyio.create_memory_object_stream[AnyTaskEvent](SUBSCRIBER_BUFFER)
        scope = anyio.CancelScope()
        self._tg.start_soon(self._follow, task_id, last[0][0] if last else "0-0", send, scope)
        self._subscribers += 1
        try:
            yield receive
        finally:
            self._subscribers -= 1
            scope.cancel()
            send.close()
            receive.close()

    async def _follow(
        self, task_id: str, last: str, send: MemoryObjectSendStream[AnyTaskEvent], scope: anyio.CancelScope
    ) -> None:
        with scope, send:
            position: int | None = None
            while True:
                try:
                    replies: Any = await self._reader.xread({f"{P}ev:{task_id}": last}, count=64, block=BLOCK_MS)
                except Exception as exc:
                    if not is_outage(exc):
                        raise
                    await anyio.sleep(0.5)
                    continue
                events: list[AnyTaskEvent] = []
                for _, entries in replies:
                    for entry_id, fields in entries:
                        last = entry_id
                        events.append(_decode(fields["e"]))
                if not events:  # quiet: the task's state says whether it ended (or moved in the queue)
                    events, position = await self._quiet(task_id, position)
                for event in events:
                    if not self._deliver(send, event):
                        return

    async def _quiet(self, task_id: str, position: int | None) -> tuple[list[AnyTaskEvent], int | None]:
        try:
            record = await self._store.get(task_id)
            now = await self._store.position(task_id)
        except Exception as exc:
            if is_outage(exc):  # StoreUnavailable included
                return [], position
            raise
        if record is None:
            return [], position
        final = final_event(record)
        if final is not None:
            return [final], position
        if now is not None and now != position:
            return [Queued(task_id=task_id, position=now)], now
        return [], position

    @staticmethod
    def _deliver(send: MemoryObjectSendStream[AnyTaskEvent], event: AnyTaskEvent) -> bool:
        """False once the subscription is over (its final event sent, or the subscriber gone)."""
        final = isinstance(event, TERMINAL_EVENTS)
        try:
            send.send_nowait(event)
        except anyio.WouldBlock:  # too slow for progress: it misses some; a final event closes it instead
            return not final
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            return False
        return not final

    # -- what views ask --

    def latest_progress(self, task_id: str) -> Progress | None:
        return None  # read from the store (`RedisStore.latest_progress`) by the live view

    def forget_progress(self, task_id: str) -> None:
        pass

    def has_subscribers(self, task_id: str) -> bool:
        return True  # they may be on any node: previews are always made

    def statistics(self) -> dict[str, int]:
        return {"subscribers": self._subscribers, "tasks_with_progress": 0}
