"""The REST surface: idempotent submits, listing, priorities, engine failures, service endpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from engines.prompt_encoder import PromptEncoder
from tests.conftest import RunningServer, server_config, start_server
from tests.helpers import submit, wait_for_state

pytestmark = pytest.mark.anyio


async def test_idempotency_key_returns_the_same_task(server: RunningServer) -> None:
    body = {"prompt": "an elf archer", "steps": 2}
    headers = {"Idempotency-Key": "order-17"}
    first = await server.client.post("/v1/generations", json=body, headers=headers)
    second = await server.client.post("/v1/generations", json=body, headers=headers)
    assert first.status_code == second.status_code == 202
    assert first.json()["id"] == second.json()["id"]
    assert first.json()["request"]["seed"] == second.json()["request"]["seed"]
    assert second.headers["idempotent-replayed"] == "true"
    assert first.headers["location"] == f"/v1/generations/{first.json()['id']}"

    different = await server.client.post("/v1/generations", json={**body, "steps": 3}, headers=headers)
    assert different.status_code == 422
    assert different.json()["error"]["field"] == "Idempotency-Key"
    listed = (await server.client.get("/v1/generations")).json()["items"]
    assert len(listed) == 1


async def test_concurrent_submits_with_one_key_make_one_task(server: RunningServer) -> None:
    ids: list[str] = []

    async def post() -> None:
        response = await server.client.post(
            "/v1/generations", json={"prompt": "twin", "steps": 1}, headers={"Idempotency-Key": "same"}
        )
        ids.append(response.json()["id"])

    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(post)
    assert len(set(ids)) == 1


async def test_list_is_newest_first_with_cursor_and_state_filter(server: RunningServer) -> None:
    tasks = [await submit(server.client, prompt=f"hero {i}", steps=1) for i in range(5)]
    for task in tasks:
        await wait_for_state(server.client, task["id"])
    page = (await server.client.get("/v1/generations?limit=2")).json()
    assert [item["id"] for item in page["items"]] == [tasks[4]["id"], tasks[3]["id"]]
    rest = (await server.client.get(f"/v1/generations?limit=10&cursor={page['next_cursor']}")).json()
    assert [item["id"] for item in rest["items"]] == [t["id"] for t in reversed(tasks[:3])]
    assert rest["next_cursor"] is None
    older = (await server.client.get(f"/v1/generations?limit=10&cursor={tasks[2]['id']}")).json()  # a task id
    assert [item["id"] for item in older["items"]] == [tasks[1]["id"], tasks[0]["id"]]
    succeeded = (await server.client.get("/v1/generations?state=succeeded&limit=100")).json()["items"]
    assert len(succeeded) == 5
    assert (await server.client.get("/v1/generations?state=queued")).json()["items"] == []


async def test_higher_priority_runs_first_and_queue_positions_are_reported(server: RunningServer) -> None:
    blocker = await submit(server.client, width=512, height=512, steps=12)
    await wait_for_state(server.client, blocker["id"], {"running"})
    low = await submit(server.client, prompt="low", steps=1)
    normal = await submit(server.client, prompt="normal", steps=1)
    high = await submit(server.client, prompt="high", steps=1, priority=5)
    assert (low["position"], normal["position"], high["position"]) == (0, 1, 0)
    positions = {t["id"]: (await server.client.get(t["links"]["self"])).json()["position"] for t in (low, normal)}
    assert positions == {low["id"]: 1, normal["id"]: 2}
    views = [await wait_for_state(server.client, t["id"]) for t in (low, normal, high)]
    started = {v["request"]["prompt"]: v["started_at"] for v in views}
    assert started["high"] < started["low"] < started["normal"]


async def test_out_of_memory_fails_that_task_alone(server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> None:
    real_encode = PromptEncoder.encode

    def encode_that_runs_out_of_memory(self: Any, job: Any, guided: bool) -> Any:
        if "enormous" in job.prompt:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_encode(self, job, guided)

    monkeypatch.setattr(PromptEncoder, "encode", encode_that_runs_out_of_memory)
    before = await submit(server.client, steps=1)
    doomed = await submit(server.client, prompt="an enormous dragon", steps=1)
    after = await submit(server.client, steps=1)
    failed = await wait_for_state(server.client, doomed["id"])
    assert failed["state"] == "failed"
    assert failed["error"]["code"] == "out_of_memory"
    assert "smaller size" in failed["error"]["message"]
    for task in (before, after):
        assert (await wait_for_state(server.client, task["id"]))["state"] == "succeeded"
    assert (await server.client.get("/readyz")).status_code == 200


async def test_engine_error_is_reported_with_its_code(server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR")

    monkeypatch.setattr(StableDiffusionXLPipeline, "__call__", broken)
    view = await wait_for_state(server.client, (await submit(server.client, steps=1))["id"])
    assert view["error"] == {
        "code": "engine_error",
        "message": "RuntimeError: cuDNN error: CUDNN_STATUS_INTERNAL_ERROR",
    }


async def test_service_endpoints(server: RunningServer) -> None:
    assert (await server.client.get("/healthz")).json() == {"status": "ok"}
    ready = (await server.client.get("/readyz")).json()
    assert ready == {
        "ready": True,
        "accepting": True,
        "engines": {"cpu": True},
        "storage_full": False,
        "store_reachable": True,
    }
    info = (await server.client.get("/v1/info")).json()
    assert info["model"]["is_tiny"] and info["model"]["min_size"] == 64 and info["model"]["max_size"] == 512
    assert {"euler", "euler_a", "dpmpp_2m_karras", "unipc"} <= set(info["schedulers"])

    spec = (await server.client.get("/openapi.json")).json()
    request_schema = spec["components"]["schemas"]["GenerationRequest"]
    assert request_schema["properties"]["num_images"]["maximum"] == 8
    assert request_schema["additionalProperties"] is False
    assert "/v1/generations/{id}/events" in spec["paths"]
    docs = await server.client.get("/docs")
    assert docs.headers["content-type"].startswith("text/html") and "GenerationRequest" in docs.text


@pytest.mark.parametrize("scheduler", ["euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "unipc", "ddim"])
async def test_every_scheduler_runs_and_is_recorded(server: RunningServer, scheduler: str) -> None:
    view = await wait_for_state(server.client, (await submit(server.client, steps=3, scheduler=scheduler))["id"])
    assert view["state"] == "succeeded"
    assert view["request"]["scheduler"] == scheduler


async def _post_at_once(server: RunningServer, bodies: list[dict[str, Any]]) -> list[httpx.Response]:
    responses = []

    async def post(body: dict[str, Any]) -> None:
        responses.append(await server.client.post("/v1/generations", json=body))

    async with anyio.create_task_group() as tg:
        for body in bodies:
            tg.start_soon(post, body)
    return responses


async def test_concurrent_submissions_never_overfill_the_queue(tmp_path: Path, tiny_model: Path) -> None:
    config = server_config(tmp_path / "data", tiny_model, max_queue=3)
    async for server in start_server(config):
        long = {"prompt": "long", "width": 512, "height": 512, "steps": 150}
        blocker = await submit(server.client, **long)
        await wait_for_state(server.client, blocker["id"], {"running"})
        responses = await _post_at_once(server, [{**long, "prompt": f"wave {n}"} for n in range(12)])
        assert sorted(response.status_code for response in responses) == [202] * 3 + [503] * 9
        refused = next(response for response in responses if response.status_code == 503)
        assert "queue is full (3 tasks)" in refused.json()["error"]["message"] and refused.headers["Retry-After"]
        queued = (await server.client.get("/v1/generations", params={"state": "queued"})).json()["items"]
        assert len(queued) == 3
        for item in [*queued, blocker]:
            await server.client.post(item["links"]["cancel"])
