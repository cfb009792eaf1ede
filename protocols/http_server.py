"""Serve an ASGI app with hypercorn as an actor: binds first (port 0 works), reports the port, drains on stop."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import anyio
from anyio.abc import TaskStatus
from hypercorn.asyncio import serve
from hypercorn.config import Config as HypercornConfig
from starlette.types import ASGIApp


class HttpServer:
    def __init__(self, app: ASGIApp, host: str, port: int, *, graceful_timeout_s: float = 5.0) -> None:
        self._app = app
        self._host = host
        self._port = port
        self._graceful_timeout_s = graceful_timeout_s
        self._stop = anyio.Event()
        self._stopped = anyio.Event()
        self.port: int | None = None

    def stop(self) -> None:
        self._stop.set()

    async def wait_stopped(self) -> None:
        """Returns once hypercorn has finished its graceful close (open connections get graceful_timeout_s)."""
        await self._stopped.wait()

    async def run(self, *, task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        sock = socket.create_server((self._host, self._port), family=family, backlog=1024)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        config = HypercornConfig()
        # Hypercorn takes the already-bound socket by descriptor; detach so only hypercorn closes it.
        config.bind = [f"fd://{sock.detach()}"]
        config.graceful_timeout = self._graceful_timeout_s
        config.accesslog = None
        config.errorlog = None
        _quiet_cancelled_connections(asyncio.get_running_loop())
        task_status.started(self.port)
        # Our own trigger: hypercorn then installs no signal handlers; the supervisor owns shutdown.
        try:
            await serve(self._app, config, shutdown_trigger=self._stop.wait)  # type: ignore[arg-type]
        finally:
            self._stopped.set()


def _quiet_cancelled_connections(loop: asyncio.AbstractEventLoop) -> None:
    """Hypercorn cancels the connections still open when its graceful timeout ends (a WebSocket, a long poll).
    Python 3.11 and 3.12 then log each as an error with a CancelledError traceback from asyncio's stream callback;
    3.13 drops them (a cancelled connection task is a closed connection). Do as 3.13 does."""
    previous = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if isinstance(context.get("exception"), asyncio.CancelledError) and "StreamReaderProtocol" in str(
            context.get("message", "")
        ):
            return
        if previous is None:
            loop.default_exception_handler(context)
        else:
            previous(loop, context)

    if getattr(previous, "__qualname__", "") != handler.__qualname__:  # once per loop, not once per server
        loop.set_exception_handler(handler)
