"""An actor that fails after it started: named first in the log, then a graceful stop, a non-zero exit, and a
restart that finishes every accepted task."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import anyio
import httpx
import pytest
from httpx_ws import aconnect_ws

from tests.helpers import wait_for_state
from tests.process import ServerProcess

pytestmark = pytest.mark.anyio

# Runs the real CLI with the post-processor's handler replaced by one that raises, as a bug would.
FAULTY_SERVER = """
import sys

from actors.postprocess import Postprocessor


async def broken_finish(self, message):
    raise RuntimeError("disk controller on fire")


Postprocessor._finish = broken_finish

from forge.cli import main

sys.exit(main(sys.argv[1:]))
"""


def error_lines(log: Path) -> list[dict[str, object]]:
    records = []
    for line in log.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("level") in ("error", "critical"):
            records.append(record)
    return records


async def test_a_failing_actor_is_named_first_then_the_server_stops_and_a_restart_finishes_the_queue(
    tmp_path: Path, tiny_model: Path
) -> None:
    script = tmp_path / "faulty_server.py"
    script.write_text(FAULTY_SERVER)
    settings = {"enable_ui": "false", "enable_mcp": "false", "log_format": "json", "drain_seconds": "5"}
    faulty = ServerProcess(tmp_path / "data", tiny_model, tmp_path / "faulty.log", **settings)
    faulty.program = [sys.executable, str(script)]
    await faulty.start()
    body = {"prompt": "a knight", "width": 64, "height": 64, "steps": 2}
    async with httpx.AsyncClient(base_url=faulty.url, timeout=60) as client:
        accepted = []
        for seed, steps in enumerate((24, 2, 2)):  # the first runs long enough for the connections below to open
            response = await client.post("/v1/generations", json={**body, "seed": seed, "steps": steps})
            assert response.status_code == 202, response.text
            accepted.append(response.json()["id"])
        assert faulty.process is not None
        # Connections still open at the stop: hypercorn cancels them, which must not print tracebacks.
        async with aconnect_ws(f"ws{faulty.url[4:]}/v1/generations/{accepted[-1]}/events", client):
            with anyio.fail_after(60):
                status = await faulty.process.wait()
    assert status == 1

    log = faulty.log.read_text()
    first_error = error_lines(faulty.log)[0]
    assert "actor postprocessor failed: RuntimeError: disk controller on fire" in str(first_error["event"])
    assert "CancelledError" not in log, log  # neither the HTTP server nor any actor printed a cancellation

    healthy = ServerProcess(
        tmp_path / "data", tiny_model, tmp_path / "healthy.log", enable_ui="false", enable_mcp="false"
    )
    await healthy.start()
    try:
        async with httpx.AsyncClient(base_url=healthy.url) as client:
            for task_id in accepted:
                view = await wait_for_state(client, task_id)
                assert view["state"] == "succeeded", view
    finally:
        assert await healthy.terminate() == 0
