"""A burst of submissions against one box: 16 clients, 2000 submits while the engine runs. Every submit is
accepted or refused as queue_full, the server stays up and answers, and after a kill -9 and a restart every
accepted task is there, each client's in the order it submitted them."""

from __future__ import annotations

from pathlib import Path

import anyio
import httpx
import pytest

from tests.helpers import all_tasks
from tests.process import ServerProcess

pytestmark = pytest.mark.anyio

CLIENTS, PER_CLIENT, MAX_QUEUE = 16, 125, 1500


async def test_a_burst_of_submissions_is_accepted_or_refused_and_survives_a_kill(
    tmp_path: Path, tiny_model: Path
) -> None:
    data, log = tmp_path / "data", tmp_path / "server.log"
    settings = {"max_queue": str(MAX_QUEUE), "enable_ui": "false", "enable_mcp": "false", "cpu_threads": "1"}
    server = ServerProcess(data, tiny_model, log, **settings)
    await server.start()
    accepted: dict[int, list[str]] = {client: [] for client in range(CLIENTS)}
    refused: list[int] = []
    unexpected: list[str] = []

    async def submitter(index: int) -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            for n in range(PER_CLIENT):
                body = {"prompt": f"hero {index}-{n}", "seed": index * 1000 + n, "width": 64, "height": 64, "steps": 20}
                response = await client.post("/v1/generations", json=body)
                if response.status_code == 202:
                    accepted[index].append(response.json()["id"])
                elif response.status_code == 503 and response.json()["error"]["code"] == "queue_full":
                    refused.append(index)
                else:
                    unexpected.append(f"{response.status_code} {response.text[:200]}")

    try:
        async with anyio.create_task_group() as tg:
            for index in range(CLIENTS):
                tg.start_soon(submitter, index)
        assert unexpected == []
        assert sum(len(ids) for ids in accepted.values()) + len(refused) == CLIENTS * PER_CLIENT
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            assert (await client.get("/readyz")).status_code in (200, 503)
            some = accepted[0][-1]
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
    order = {task["id"]: position for position, task in enumerate(tasks)}
    for ids in accepted.values():
        assert all(task_id in order for task_id in ids)
        assert [order[task_id] for task_id in ids] == sorted(order[task_id] for task_id in ids)
