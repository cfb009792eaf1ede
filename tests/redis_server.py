"""Run a real Redis (Debian's `redis-server`) for the tests of the Redis store."""

from __future__ import annotations

import shutil
import signal
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
from anyio.abc import Process

from tests.helpers import free_port

REDIS_SERVER = shutil.which("redis-server")

requires_redis = pytest.mark.skipif(
    REDIS_SERVER is None,
    reason="redis-server is not installed (Debian package redis-server); the Redis store tests need a real one",
)


class RedisServer:
    """One redis-server on a free loopback port, fsyncing every write to an append-only file in `directory`,
    so that a restart after SIGKILL replays everything it acknowledged."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.process: Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self, ready_timeout_s: float = 20) -> None:
        assert REDIS_SERVER is not None, "redis-server is not installed"
        self.directory.mkdir(parents=True, exist_ok=True)
        command = [
            REDIS_SERVER,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--save", "",
            "--daemonize", "no",
            "--protected-mode", "no",
            "--logfile", str(self.directory / "redis.log"),
        ]  # fmt: skip
        # What it prints before the log file is open (a bad option, say) goes here.
        with open(self.directory / "redis.out", "ab") as out:
            self.process = await anyio.open_process(command, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        try:
            with anyio.fail_after(ready_timeout_s):
                while not await self._pong():
                    if self.process.returncode is not None:
                        raise RuntimeError(f"redis-server exited with {self.process.returncode}; see {self.directory}")
                    await anyio.sleep(0.05)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.kill()
            raise

    async def _pong(self) -> bool:
        # Bounded, so that a port someone else holds is noticed through redis-server exiting.
        with anyio.move_on_after(1):
            try:
                async with await anyio.connect_tcp("127.0.0.1", self.port) as stream:
                    await stream.send(b"PING\r\n")
                    reply = b""
                    while not reply.endswith(b"\r\n"):
                        reply += await stream.receive()
                    # While loading the append-only file it answers -LOADING instead.
                    return reply == b"+PONG\r\n"
            except (OSError, anyio.EndOfStream, anyio.BrokenResourceError):
                pass
        return False

    async def kill(self) -> None:
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)
        await self.process.wait()

    async def stop(self) -> None:
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        with anyio.move_on_after(10):
            await self.process.wait()
            return
        await self.kill()

    async def restart(self) -> None:
        """Start again on the same port and directory, replaying the append-only file."""
        if self.process is not None and self.process.returncode is None:
            await self.stop()
        await self.start()


@asynccontextmanager
async def running_redis(directory: Path) -> AsyncIterator[RedisServer]:
    redis = RedisServer(directory)
    await redis.start()
    try:
        yield redis
    finally:
        with anyio.CancelScope(shield=True):
            await redis.stop()
