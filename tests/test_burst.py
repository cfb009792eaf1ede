"""A burst of submissions against one box: 16 clients, 2000 submits while the engine runs. Every submit is
accepted or refused as queue_full, the server stays up and answers, and after a kill -9 and a restart every
accepted task is there, each client's in the order it submitted them."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.helpers import all_tasks, submit_burst
from tests.process import ServerProcess

pytestmark = pytest.mark.anyio

CLIENTS, PER_CLIENT, MAX_QUEUE = 16, 125, 1500
FRAME = {"width": 64, "height": 64, "steps": 20}


async def test_a_burst_of_submissions_is_accepted_or_refused_and_survives_a_kill(
    tmp_path: Path, tiny_model: Path
) -> None:
    data, log = tmp_path / "data", tmp_path / "server.log"
    settings = {"max_queue": str(MAX_QUEUE), "enable_ui": "false", "enable_mcp": "false", "cpu_threads": "1"}
    server = ServerProcess(data, tiny_model, log, **settings)
    await server.start()
    try:
        burst = await submit_burst(
            lambda index: httpx.AsyncClient(base_url=server.url, timeout=60),
            CLIENTS,
            PER_CLIENT,
            lambda index, n: {"prompt": f"hero {index}-{n}", "seed": index * 1000 + n, **FRAME},
        )
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            assert (await client.get("/readyz")).status_code in (200, 503)
            some = burst.accepted[0][-1]
            assert (await client.get(f"/v1/generations/{some}")).json()["id"] == some
    finally:
        await server.kill()

    restarted = ServerProcess(data, tiny_model, log, **settings)
    await restarted.start()
    try:
        async with httpx.AsyncClient(base_url=restarted.url, timeout=30) as client:
            tasks = await all_tasks(client)
    finally:
        await restarted.terminate()
    burst.assert_kept_in_order(tasks)
