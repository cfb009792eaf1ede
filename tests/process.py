"""Run `chara-forge serve` as a separate process, the way users run it."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import anyio
import httpx
from anyio.abc import Process

from tests.conftest import wait_ready
from tests.helpers import free_port


class ServerProcess:
    def __init__(self, data_dir: Path, model: Path, log: Path, **settings: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.env = {
            **os.environ,
            "FORGE_DATA_DIR": str(data_dir),
            "FORGE_MODEL": str(model),
            "FORGE_API_PORT": str(self.port),
            "FORGE_MCP_PORT": str(free_port()),
            "FORGE_UI_PORT": str(free_port()),
            "FORGE_HOST": "127.0.0.1",
            "HF_HUB_OFFLINE": "1",
            **{f"FORGE_{key.upper()}": value for key, value in settings.items()},
        }
        self.process: Process | None = None
        self.options: list[str] = []
        self.program = [sys.executable, "-m", "forge.cli"]

    def with_config(self, path: Path) -> ServerProcess:
        """Read this TOML file too (settings the environment cannot give, such as plans)."""
        self.options = ["--config", str(path)]
        return self

    async def start(self, ready_timeout_s: float = 90) -> None:
        with open(self.log, "ab") as log:
            self.process = await anyio.open_process(
                [*self.program, *self.options, "serve"], env=self.env, stdout=log, stderr=log
            )
        async with httpx.AsyncClient(base_url=self.url) as client:
            with anyio.fail_after(ready_timeout_s):
                while True:
                    try:
                        await wait_ready(client, timeout_s=ready_timeout_s)
                        return
                    except httpx.TransportError:
                        await anyio.sleep(0.1)

    async def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        await self.process.wait()

    async def terminate(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        with anyio.fail_after(60):
            return await self.process.wait()
