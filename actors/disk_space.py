"""A full disk pauses writes instead of failing tasks or stopping the server.

Accepted work that cannot be recorded (a task's next state in SQLite, its images on disk) waits on its
actor, in memory, and is written once space is freed: nothing accepted is lost and nothing crashes. New
submissions are refused meanwhile (503 `storage_full`), and /readyz says so, so a load balancer sends work
elsewhere. A shutdown while waiting leaves the task as last recorded, to run again at the next start."""

from __future__ import annotations

import errno
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio

from forge.errors import ServiceUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

FIRST_RETRY_S = 0.5
MOST_RETRY_S = 10.0
REPORT_EVERY_S = 60.0


class StorageFull(ServiceUnavailable):
    code = "storage_full"

    def __init__(self) -> None:
        super().__init__("the server's disk is full: new tasks are refused until space is freed", retry_after_s=30)


def is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, sqlite3.OperationalError):
        return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


class DiskSpace:
    """Which writes are waiting for space now (one server shares one). The same wait serves a store that is
    out of reach for a while (Redis): `waits_on` says which errors are worth waiting out, `reason` names them."""

    def __init__(self, waits_on: Callable[[BaseException], bool] = is_disk_full, reason: str = "disk full") -> None:
        self._waiting = 0
        self._waits_on = waits_on
        self._reason = reason

    @property
    def full(self) -> bool:
        return self._waiting > 0

    @property
    def waiting(self) -> int:
        return self._waiting

    async def write(self, what: str, attempt: Callable[[], Awaitable[T]]) -> T:
        """`attempt()`, tried again (with growing pauses) for as long as the disk is full."""
        delay, since, reported = FIRST_RETRY_S, 0.0, 0.0
        waiting = False
        try:
            while True:
                try:
                    result = await attempt()
                except Exception as exc:
                    if not self._waits_on(exc):
                        raise
                    now = time.monotonic()
                    if not waiting:
                        since = reported = now
                        waiting = True
                        self._waiting += 1
                        log.error("%s: %s waits (%s)", self._reason, what, exc)
                    elif now - reported >= REPORT_EVERY_S:
                        reported = now
                        log.error("%s: %s still waiting after %.0f s", self._reason, what, now - since)
                    await anyio.sleep(delay)
                    delay = min(delay * 2, MOST_RETRY_S)
                    continue
                if waiting:
                    log.warning("%s no more: %s written after %.0f s", self._reason, what, time.monotonic() - since)
                return result
        finally:
            if waiting:
                self._waiting -= 1
