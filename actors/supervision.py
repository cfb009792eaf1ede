"""What happens when an actor raises after it started: it is named in the log's first error line, then the whole
server stops gracefully (refuse new work, drain, leave the queue in the store) and exits non-zero, so that its
container's restart policy starts it again.

Restarting the one actor in place was not chosen. An actor's state is more than the store's: the channels it
held, the batch it was building, the thread it ran on. The one state every actor can be rebuilt from is the
store's, and a process start already rebuilds everything from it (the same recovery that follows a kill -9,
which the tests exercise). A failure before an actor reports itself started is a startup error and propagates
as one.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from anyio.abc import TaskGroup, TaskStatus

log = logging.getLogger(__name__)

Actor = Callable[..., Awaitable[None]]  # an actor's run(*, task_status)


class ActorFailed(Exception):
    def __init__(self, actor: str, error: BaseException) -> None:
        super().__init__(f"actor {actor} failed: {type(error).__name__}: {error}")
        self.actor = actor
        self.error = error


class _Reported:
    """A task status that remembers whether the actor reported itself started."""

    def __init__(self, status: TaskStatus[Any]) -> None:
        self._status = status
        self.started_ = False

    def started(self, value: Any = None) -> None:
        self.started_ = True
        self._status.started(value)


class Supervision:
    def __init__(self) -> None:
        self.stop = anyio.Event()  # set by a failure, or by the caller's shutdown
        self.failure: ActorFailed | None = None

    async def start(self, tg: TaskGroup, name: str, run: Actor) -> Any:
        return await tg.start(self._supervised, name, run)

    def start_soon(self, tg: TaskGroup, name: str, run: Actor) -> None:
        tg.start_soon(self._supervised, name, run)

    async def _supervised(
        self, name: str, run: Actor, *, task_status: TaskStatus[Any] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        reported = _Reported(task_status)
        try:
            await run(task_status=reported)
        except Exception as exc:
            if not reported.started_:
                raise
            self._failed(name, exc)

    def _failed(self, name: str, exc: Exception) -> None:
        if self.failure is not None:  # the first failure is the cause; later ones are often its effects
            log.error("actor %s failed too: %s: %s", name, type(exc).__name__, exc, exc_info=exc)
            return
        self.failure = ActorFailed(name, exc)
        log.critical(
            "actor %s failed: %s: %s; stopping gracefully (new work refused, running work drained, the queue "
            "kept in the store) and exiting non-zero to be restarted",
            name,
            type(exc).__name__,
            exc,
            exc_info=exc,
        )
        self.stop.set()
