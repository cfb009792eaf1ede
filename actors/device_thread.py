"""A long-lived OS thread that runs every blocking call for one device, one at a time, in order.

Why not `anyio.to_thread`: its pool hands successive calls to whichever worker is idle. PyTorch's CPU
kernels keep one OpenMP team per calling thread, and as soon as two threads own a team the runtime
oversubscribes the cores: the tiny model ran 2.5x slower on this machine's two cores. CUDA work also
prefers one host thread per device. Like `to_thread.run_sync`, a call that has started is waited for even
when the caller is cancelled; `on_cancel` lets the caller make it end sooner.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import anyio.from_thread
import anyio.lowlevel

T = TypeVar("T")

_STOP = object()


class DeviceThread:
    def __init__(self, name: str) -> None:
        self._name = name
        self._calls: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.token: anyio.lowlevel.EventLoopToken | None = None

    async def run_sync(self, fn: Callable[..., T], *args: Any, on_cancel: Callable[[], None] | None = None) -> T:
        """Run `fn(*args)` on the thread. If the caller is cancelled meanwhile, `on_cancel` is called (to ask
        `fn` to stop early) and the call is still waited for before the cancellation propagates."""
        if self._thread is None:
            self.token = anyio.lowlevel.current_token()
            self._thread = threading.Thread(target=self._serve, name=self._name, daemon=True)
            self._thread.start()
        done = anyio.Event()
        outcome: list[tuple[bool, Any]] = []
        self._calls.put((fn, args, done, outcome))
        try:
            await done.wait()
        except anyio.get_cancelled_exc_class():
            if on_cancel is not None:
                on_cancel()
            with anyio.CancelScope(shield=True):
                await done.wait()
            raise
        succeeded, value = outcome[0]
        if succeeded:
            return value  # type: ignore[no-any-return]
        raise value

    def stop(self) -> None:
        """Let the thread end after the calls already queued (does not wait)."""
        if self._thread is not None:
            self._calls.put(_STOP)

    def _serve(self) -> None:
        while (item := self._calls.get()) is not _STOP:
            fn, args, done, outcome = item
            try:
                outcome.append((True, fn(*args)))
            except BaseException as exc:  # handed to the awaiting task, which re-raises it
                outcome.append((False, exc))
            anyio.from_thread.run_sync(done.set, token=self.token)
