from __future__ import annotations

from typing import Any

import anyio
import httpx

FINAL_STATES = {"succeeded", "failed", "cancelled", "filtered"}


async def submit(client: httpx.AsyncClient, **fields: Any) -> dict[str, Any]:
    body = {"prompt": "a knight in silver armour", **fields}
    response = await client.post("/v1/generations", json=body)
    assert response.status_code == 202, response.text
    result: dict[str, Any] = response.json()
    return result


async def wait_for_state(
    client: httpx.AsyncClient, task_id: str, states: set[str] = FINAL_STATES, timeout_s: float = 60
) -> dict[str, Any]:
    with anyio.fail_after(timeout_s):
        while True:
            view: dict[str, Any] = (await client.get(f"/v1/generations/{task_id}")).json()
            if view["state"] in states:
                return view
            await anyio.sleep(0.02)
