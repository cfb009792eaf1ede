"""Hand values from a worker thread to the event loop where only the newest matters (step progress).

The producer never waits for the loop: while one hand-off is pending, newer values replace the pending
one, so a busy loop costs skipped progress updates, never a slower denoising step.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

import anyio
from anyio.from_thread import BlockingPortal

T = TypeVar("T")


class LatestValue(Generic[T]):
    def __init__(self, portal: BlockingPortal, consume: Callable[[T], None]) -> None:
        self._portal = portal
        self._consume = consume
        self._lock = threading.Lock()
        self._pending: list[T] = []
        self._delivered: anyio.Event | None = None

    def put(self, value: T) -> None:
        """Called from the worker thread."""
        with self._lock:
            scheduled = bool(self._pending)
            self._pending[:] = [value]
        if not scheduled:
            self._portal.start_task_soon(self._deliver)

    async def wait_delivered(self) -> None:
        """Returns once the latest value put has been handed over (call from the event loop)."""
        while True:
            with self._lock:
                if not self._pending:
                    return
            self._delivered = anyio.Event()
            await self._delivered.wait()

    async def _deliver(self) -> None:
        with self._lock:
            value = self._pending.pop()
        self._consume(value)
        if self._delivered is not None:
            self._delivered.set()
