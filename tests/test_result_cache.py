"""The result cache: an identical request with a fixed seed is answered by the task that made its images."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest

from actors.keys import KeyStore, SqliteKeys
from tests.conftest import RunningServer, server_config, start_server
from tests.helpers import wait_for_state

pytestmark = pytest.mark.anyio

BODY = {"prompt": "a knight", "seed": 7, "steps": 2}


async def finished(client: httpx.AsyncClient, body: dict[str, object]) -> httpx.Response:
    response = await client.post("/v1/generations", json=body)
    assert response.status_code == 202, response.text
    assert (await wait_for_state(client, response.json()["id"]))["state"] == "succeeded"
    return response


async def test_an_identical_seeded_request_is_answered_by_the_earlier_task(server: RunningServer) -> None:
    client = server.client
    first = await finished(client, BODY)
    again = await client.post("/v1/generations", json={**BODY, "priority": 3})  # priority changes no pixel
    assert again.headers["result-cache"] == "hit" and again.json()["id"] == first.json()["id"]
    assert again.json()["state"] == "succeeded"
    other = await finished(client, {**BODY, "steps": 3})
    assert "result-cache" not in other.headers and other.json()["id"] != first.json()["id"]
    unseeded = [await finished(client, {"prompt": "a knight", "steps": 2}) for _ in range(2)]
    assert unseeded[0].json()["id"] != unseeded[1].json()["id"]  # a random seed is a new image every time
    assert len((await client.get("/v1/generations")).json()["items"]) == 4


async def test_gone_images_are_made_again(tmp_path: Path, tiny_model: Path) -> None:
    async for server in start_server(server_config(tmp_path / "data", tiny_model)):
        first = await finished(server.client, BODY)
        shutil.rmtree(tmp_path / "data" / "outputs" / first.json()["id"])
        again = await finished(server.client, BODY)
        assert again.json()["id"] != first.json()["id"] and "result-cache" not in again.headers


async def test_the_cache_is_per_owner_and_can_be_turned_off(tmp_path: Path, tiny_model: Path) -> None:
    data = tmp_path / "data"
    keys = KeyStore(SqliteKeys(data / "forge.sqlite3"))
    tokens = {owner: keys.create(owner, "unlimited", ["generate"])[1] for owner in ("alice", "bob")}
    async for server in start_server(server_config(data, tiny_model, auth=True)):
        ids = []
        for owner in ("alice", "bob"):
            headers = {"Authorization": f"Bearer {tokens[owner]}"}
            async with httpx.AsyncClient(base_url=server.base_url, headers=headers) as client:
                ids.append((await finished(client, BODY)).json()["id"])
        assert ids[0] != ids[1]  # bob's request does not get alice's task
    async for server in start_server(server_config(tmp_path / "off", tiny_model, result_cache=False)):
        first, second = await finished(server.client, BODY), await finished(server.client, BODY)
        assert first.json()["id"] != second.json()["id"]
