"""Durability: kill -9 the server at random moments; every accepted task still ends exactly once."""

from __future__ import annotations

import io
import random
import signal
import time
from collections import Counter
from pathlib import Path

import anyio
import httpx
import pytest
from PIL import Image

from tests.helpers import FINAL_STATES, wait_for_state
from tests.process import ServerProcess

pytestmark = pytest.mark.anyio

TASKS = 30
KILLS = 5


@pytest.mark.slow
async def test_kill_nine_at_random_moments_loses_nothing(
    tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seed = int(time.time())
    rng = random.Random(seed)
    # REST alone: a kill -9 gives the adapters no shutdown to test, and six starts without Gradio save ~20 s.
    rest_only = {"enable_ui": "false", "enable_mcp": "false"}
    server = ServerProcess(tmp_path / "data", tiny_model, tmp_path / "server.log", **rest_only)
    bodies = {
        f"task-{i}": {
            "prompt": f"hero {i}",
            "seed": i,
            "width": 128,
            "height": 128,
            "steps": rng.randint(4, 12),
            "priority": rng.choice([0, 0, 1]),
        }
        for i in range(TASKS)
    }
    pending = list(bodies)
    accepted: dict[str, str] = {}
    refused_connections = 0

    async def submit_some(client: httpx.AsyncClient, count: int) -> None:
        nonlocal refused_connections
        for _ in range(count):
            if not pending:
                return
            key = pending[0]
            try:
                response = await client.post("/v1/generations", json=bodies[key], headers={"Idempotency-Key": key})
            except httpx.TransportError:  # killed mid-request: retried with the same key after the restart
                refused_connections += 1
                return
            assert response.status_code == 202, response.text
            accepted[key] = response.json()["id"]
            pending.pop(0)
            await anyio.sleep(rng.uniform(0, 0.15))

    for _ in range(KILLS):
        await server.start()
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client, anyio.create_task_group() as tg:
            tg.start_soon(submit_some, client, rng.randint(4, 9))
            await anyio.sleep(rng.uniform(0.2, 2.0))  # the moment of the kill
            await server.kill()
            tg.cancel_scope.cancel()

    await server.start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            while pending:
                await submit_some(client, len(pending))
            views = [
                await wait_for_state(client, task_id, FINAL_STATES, timeout_s=180) for task_id in accepted.values()
            ]
            # Retrying every key returns the task it first created: no duplicates after all the kills.
            for key, body in bodies.items():
                again = await client.post("/v1/generations", json=body, headers={"Idempotency-Key": key})
                assert again.json()["id"] == accepted[key]
            listed = (await client.get("/v1/generations?limit=100")).json()["items"]
            for view in views:
                if view["state"] == "succeeded":
                    image = await client.get(view["images"][0]["url"])
                    Image.open(io.BytesIO(image.content)).load()  # whole files only, never half-written
    finally:
        await server.terminate()

    counts = Counter(view["state"] for view in views)
    attempts = Counter(view["attempt"] for view in views)
    with capsys.disabled():
        print(
            f"\nkill test (seed {seed}): {len(accepted)} accepted after {KILLS} kills; final states "
            f"{dict(counts)}; attempts {dict(sorted(attempts.items()))}; submissions cut by a kill and "
            f"retried: {refused_connections}"
        )
    assert len(accepted) == TASKS and len(listed) == TASKS
    assert sum(counts.values()) == TASKS and set(counts) <= FINAL_STATES
    assert all(view["state"] == "succeeded" or view["error"]["code"] == "worker_lost" for view in views)


async def test_sigterm_drains_then_resumes_interrupted_work(tmp_path: Path, tiny_model: Path) -> None:
    server = ServerProcess(tmp_path / "data", tiny_model, tmp_path / "server.log", drain_seconds="0.5")
    await server.start()
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        long = (
            await client.post("/v1/generations", json={"prompt": "long", "width": 384, "height": 384, "steps": 40})
        ).json()  # seconds of work: far longer than the 0.5 s drain, short enough to finish after the restart
        waiting = (await client.post("/v1/generations", json={"prompt": "waiting", "steps": 2})).json()
        await wait_for_state(client, long["id"], {"running"})
    assert await server.terminate() == 0

    await server.start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            resumed = await wait_for_state(client, long["id"], FINAL_STATES, timeout_s=120)
            other = await wait_for_state(client, waiting["id"], FINAL_STATES)
    finally:
        await server.terminate()
    assert resumed["state"] == other["state"] == "succeeded"
    assert resumed["attempt"] == 1, "a graceful stop does not count against the task's attempts"
    log = (tmp_path / "server.log").read_text()
    assert "graceful shutdown" in log and "resuming" in log


async def test_a_second_signal_stops_at_once_and_the_task_waits_for_the_next_start(
    tmp_path: Path, tiny_model: Path
) -> None:
    server = ServerProcess(tmp_path / "data", tiny_model, tmp_path / "server.log", drain_seconds="60")
    await server.start()
    assert server.process is not None
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        long = (
            await client.post("/v1/generations", json={"prompt": "long", "width": 512, "height": 512, "steps": 150})
        ).json()
        await wait_for_state(client, long["id"], {"running"})
    server.process.send_signal(signal.SIGTERM)
    server.process.send_signal(signal.SIGTERM)  # at once: the same stop twice (Ctrl-C under `just`)
    await anyio.sleep(1.5)
    assert server.process.returncode is None, "two signals at once still mean a graceful stop"
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)  # later: stop now, without waiting out the 60 s drain
    with anyio.fail_after(20):
        await server.process.wait()
    assert time.monotonic() - started < 15

    await server.start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            view = (await client.get(f"/v1/generations/{long['id']}")).json()
            await client.post(f"/v1/generations/{long['id']}/cancel")
    finally:
        await server.terminate()
    assert view["attempt"] == 1 and view["state"] in {"queued", "running"}
