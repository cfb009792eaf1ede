"""Structured logs: with log_format=json every line is a JSON object, and the lines about a task carry
its task id and the request id it came in with, from every actor it passes through."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tests.helpers import wait_for_state
from tests.process import ServerProcess

pytestmark = pytest.mark.anyio


async def test_a_request_id_follows_its_task_through_the_actors(tmp_path: Path, tiny_model: Path) -> None:
    log = tmp_path / "server.log"
    server = ServerProcess(tmp_path / "data", tiny_model, log, log_format="json", enable_ui="false", enable_mcp="false")
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            response = await client.post(
                "/v1/generations", json={"prompt": "a bard"}, headers={"X-Request-Id": "req-42.a"}
            )
            assert response.headers["x-request-id"] == "req-42.a"
            task_id = response.json()["id"]
            assert (await wait_for_state(client, task_id))["state"] == "succeeded"
            generated = (await client.post("/v1/generations", json={"prompt": "x"})).headers["x-request-id"]
            assert len(generated) == 32
    finally:
        assert await server.terminate() == 0
    lines = [line for line in log.read_text().splitlines() if line.startswith("{")]
    records = [json.loads(line) for line in lines]
    assert records and all({"event", "level", "timestamp", "logger"} <= set(r) for r in records)
    ours = [r for r in records if r.get("request_id") == "req-42.a"]
    assert {r["logger"] for r in ours} >= {"actors.ingress", "actors.scheduler", "actors.postprocess"}
    assert all(r.get("task_id") == task_id for r in ours)
