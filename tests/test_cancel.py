"""Cancel hits exactly the named task, whether it waits in the queue or runs on the engine."""

from __future__ import annotations

import pytest

from tests.conftest import RunningServer
from tests.helpers import submit, wait_for_state

pytestmark = pytest.mark.anyio

LONG = {"width": 512, "height": 512, "steps": 150}


async def test_cancel_queued_and_running_tasks_others_finish(server: RunningServer) -> None:
    client = server.client
    running = await submit(client, **LONG)
    queued_keep = await submit(client, steps=2)
    queued_cancel = await submit(client, steps=2)
    queued_after = await submit(client, steps=2)
    await wait_for_state(client, running["id"], {"running"})

    response = await client.post(queued_cancel["links"]["cancel"])
    assert response.status_code == 200
    assert response.json()["state"] == "cancelled"

    with_progress = await wait_for_state(client, running["id"], {"running"})
    response = await client.post(running["links"]["cancel"])
    assert response.json()["state"] == "cancelled", response.json()
    assert with_progress["request"]["steps"] == 150

    assert (await wait_for_state(client, queued_keep["id"]))["state"] == "succeeded"
    assert (await wait_for_state(client, queued_after["id"]))["state"] == "succeeded"
    final = (await client.get(running["links"]["self"])).json()
    assert final["state"] == "cancelled" and final["images"] == []
    assert (await client.get(queued_cancel["links"]["self"])).json()["state"] == "cancelled"


async def test_cancelled_running_task_stops_early(server: RunningServer) -> None:
    task = await submit(server.client, **LONG)
    await wait_for_state(server.client, task["id"], {"running"})
    await server.client.post(task["links"]["cancel"])
    view = await wait_for_state(server.client, task["id"], timeout_s=10)
    assert view["state"] == "cancelled"
    assert view["timings"]["running_s"] < 4, "the engine stopped at the next step, not at the end"


async def test_cancel_is_idempotent_and_refuses_finished_or_unknown(server: RunningServer) -> None:
    done = await submit(server.client, steps=1)
    await wait_for_state(server.client, done["id"])
    response = await server.client.post(done["links"]["cancel"])
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "conflict"

    queued = await submit(server.client, **LONG)
    assert (await server.client.post(queued["links"]["cancel"])).json()["state"] == "cancelled"
    again = await server.client.post(queued["links"]["cancel"])
    assert again.status_code == 200 and again.json()["state"] == "cancelled"

    missing = await server.client.post("/v1/generations/does-not-exist/cancel")
    assert missing.status_code == 404
    assert missing.json()["error"] == {
        "code": "not_found",
        "message": "no generation with id 'does-not-exist'",
        "field": "id",
    }
