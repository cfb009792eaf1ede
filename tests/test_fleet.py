"""A fleet on one real redis-server: two API nodes and two workers, each a real `chara-forge serve` process
with its own data directory, so everything they share goes through Redis."""

from __future__ import annotations

import io
import json
import random
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import httpx2
import jwt
import numpy as np
import pytest
import redis
from gradio_client import Client
from httpx_ws import aconnect_ws
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.types import ImageContent
from PIL import Image

from actors.keys import KeyStore, RedisKeys
from tests.helpers import FINAL_STATES, Samples, all_tasks, scrape_metrics, submit_burst
from tests.process import ServerProcess
from tests.redis_server import REDIS_SERVER, RedisServer, running_redis
from tests.test_ui import gallery_files, run_generate

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

SMALL = {"width": 64, "height": 64, "steps": 3}
JWT_SECRET = "fleet-test-secret-of-thirty-two-bytes"
MAX_QUEUE = 200
CONFIG = f"""
jwt_secret = "{JWT_SECRET}"
max_queue = {MAX_QUEUE}

[plans.unlimited]

[plans.trial]
requests = 5
window_s = 3600
"""


@dataclass
class Fleet:
    redis: RedisServer
    apis: list[ServerProcess]
    workers: list[ServerProcess]
    tokens: dict[str, str]
    root: Path
    model: Path

    def client(self, node: int, owner: str = "ann") -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {self.tokens[owner]}"}
        return httpx.AsyncClient(base_url=self.apis[node].url, headers=headers, timeout=30)

    def worker(self, name: str, **extra: str) -> ServerProcess:
        settings = {"store": self.redis.url, "role": "worker", "node_name": name, "claim_timeout_s": "3", **extra}
        return ServerProcess(
            self.root / name,
            self.model,
            self.root / f"{name}.log",
            auth="true",
            **settings,
        ).with_config(self.root / "forge.toml")


async def wait_final(client: httpx.AsyncClient, task_id: str, timeout_s: float = 90) -> dict[str, object]:
    with anyio.fail_after(timeout_s):
        while True:
            response = await client.get(f"/v1/generations/{task_id}")
            if response.status_code == 503:  # the store is coming back: retry, as Retry-After asks
                await anyio.sleep(0.2)
                continue
            view: dict[str, object] = response.json()
            if view["state"] in FINAL_STATES:
                return view
            await anyio.sleep(0.05)


@asynccontextmanager
async def started_fleet(root: Path, tiny_model: Path) -> AsyncIterator[Fleet]:
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (Debian package redis-server); the fleet tests need one")
    (root / "forge.toml").write_text(CONFIG + f'\n[models]\nsecond = "{tiny_model}"\n')
    async with running_redis(root / "redis") as server:
        keys = KeyStore(RedisKeys(redis.Redis.from_url(server.url)))
        tokens = {
            owner: keys.create(owner, plan, ["generate"])[1]
            for owner, plan in (("ann", "unlimited"), ("bob", "unlimited"), ("tia", "trial"))
        }
        tokens["root"] = keys.create("root", "unlimited", ["generate", "admin"])[1]
        fleet = Fleet(server, [], [], tokens, root, tiny_model)
        for index in (1, 2):
            settings = {"store": server.url, "role": "api", "node_name": f"api{index}", "claim_timeout_s": "3"}
            fleet.apis.append(
                ServerProcess(
                    root / f"api{index}",
                    tiny_model,
                    root / f"api{index}.log",
                    auth="true",
                    **settings,
                ).with_config(root / "forge.toml")
            )
        fleet.workers = [fleet.worker("w1"), fleet.worker("w2")]
        try:
            async with anyio.create_task_group() as tg:
                for node in [*fleet.apis, *fleet.workers]:
                    tg.start_soon(node.start)
            yield fleet
        finally:
            for node in [*fleet.apis, *fleet.workers]:
                if node.process is not None and node.process.returncode is None:
                    await node.kill()


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"  # as conftest's, for as long as the module's shared fleet runs


@pytest.fixture
async def fleet(tmp_path: Path, tiny_model: Path) -> AsyncIterator[Fleet]:
    """A fleet of its own, for a test that kills or replaces its nodes."""
    async with started_fleet(tmp_path, tiny_model) as started:
        yield started


@pytest.fixture(scope="module")
async def shared_fleet(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> AsyncIterator[Fleet]:
    """One fleet for the tests that leave every node running and wait for all they submit: starting four
    server processes and Redis takes a quarter of a minute."""
    async with started_fleet(tmp_path_factory.mktemp("fleet"), tiny_model) as started:
        yield started


async def test_two_api_nodes_and_two_workers_share_one_queue(shared_fleet: Fleet) -> None:
    fleet = shared_fleet
    async with fleet.client(0) as one, fleet.client(1) as two:
        workers_before, apis_before = await _fleet_metrics(fleet, one)
        ids = []
        for index in range(40):
            response = await (one, two)[index % 2].post("/v1/generations", json={"prompt": f"hero {index}", **SMALL})
            assert response.status_code == 202, response.text
            ids.append(response.json()["id"])
        views = [await wait_final((one, two)[i % 2], task_id) for i, task_id in enumerate(ids)]
        assert {view["state"] for view in views} == {"succeeded"}
        made_by = Counter(str(view["worker"]) for view in views)
        print("tasks per worker:", dict(made_by))
        assert set(made_by) == {"w1", "w2"} and min(made_by.values()) >= 10

        # Each worker's /metrics counts the tasks it ran, the API nodes the submissions: each task once in all.
        succeeded = ("chara_forge_generations_total", (("state", "succeeded"), ("style", "none")))
        new = ("chara_forge_submissions_total", (("how", "new"),))
        workers_after, apis_after = await _fleet_metrics(fleet, one)
        workers = {name: _counted(workers_before[name], samples) for name, samples in workers_after.items()}
        apis = [_counted(before, after) for before, after in zip(apis_before, apis_after, strict=True)]
        for name, samples in workers.items():
            assert samples[succeeded] == made_by[name] and samples.get(new, 0) == 0, name
            assert samples[("chara_forge_denoise_seconds_count", ())] == made_by[name]
            assert samples[("chara_forge_postprocess_seconds_count", ())] == made_by[name]
            assert workers_after[name][("chara_forge_engine_busy_ratio", (("device", "cpu"),))] > 0
        assert sum(samples[("chara_forge_images_total", ())] for samples in workers.values()) == 40
        assert [samples[new] for samples in apis] == [20, 20]
        assert all(samples.get(succeeded, 0) == 0 for samples in apis)
        for view in views[:6]:
            url = view["images"][0]["url"]  # type: ignore[index]
            first, second = (await one.get(url)), (await two.get(url))
            assert first.status_code == second.status_code == 200 and first.content == second.content
        listed = (await two.get("/v1/generations", params={"limit": 100})).json()["items"]
        assert {item["id"] for item in listed} == set(ids)

        # A WebSocket on node 2 follows a task submitted to node 1 to its end, previews included.
        task = (
            await one.post("/v1/generations", json={"prompt": "watched", "width": 64, "height": 64, "steps": 6})
        ).json()
        events = []
        async with aconnect_ws(f"{fleet.apis[1].url.replace('http', 'ws')}{task['links']['events']}", two) as ws:
            while True:
                event = json.loads(await ws.receive_text())
                events.append(event)
                if event["type"] in ("succeeded", "failed", "cancelled"):
                    break
        kinds = [event["type"] for event in events]
        assert kinds[-1] == "succeeded" and "progress" in kinds, kinds

        # MCP on node 2, stateless behind a balancer, waits for a generation a worker makes.
        mcp_url = f"http://127.0.0.1:{fleet.apis[1].env['FORGE_MCP_PORT']}/mcp"
        async with (
            httpx2.AsyncClient(headers={"Authorization": f"Bearer {fleet.tokens['ann']}"}, timeout=60) as http,
            streamable_http_client(mcp_url, http_client=http) as streams,
            ClientSession(streams[0], streams[1]) as session,
        ):
            await session.initialize()
            result = await session.call_tool("generate_character", {"prompt": "via mcp", "size": "64x64"})
        assert not result.is_error, result.content
        assert any(isinstance(content, ImageContent) for content in result.content)

        # The web UI on node 1 shows progress and the images a worker made; node 2 lists the task.
        def use_the_page() -> list[tuple[Any, ...]]:
            page = Client(
                f"http://127.0.0.1:{fleet.apis[0].env['FORGE_UI_PORT']}/",
                auth=("ann", fleet.tokens["ann"]),
                verbose=False,
            )
            try:
                return run_generate(page, prompt="from the page", steps=4)
            finally:
                page.close()

        updates = await anyio.to_thread.run_sync(use_the_page)
        assert any("step 4/4" in update[0] for update in updates) and "Done: 1 image" in updates[-1][0], updates[-1]
        assert len(gallery_files(updates[-1])) == 1
        prompts = [
            item["request"]["prompt"]
            for item in (await two.get("/v1/generations", params={"limit": 1})).json()["items"]
        ]
        assert prompts == ["from the page"]

        # Another owner sees none of it, through either node.
        async with fleet.client(0, "bob") as bob_one, fleet.client(1, "bob") as bob_two:
            assert (await bob_one.get(f"/v1/generations/{ids[0]}")).status_code == 404
            assert (await bob_two.get(f"/v1/generations/{ids[1]}")).status_code == 404


async def _fleet_metrics(fleet: Fleet, client: httpx.AsyncClient) -> tuple[dict[str, Samples], list[Samples]]:
    """Each worker's samples by name, and each API node's."""
    workers = {
        node.env["FORGE_NODE_NAME"]: await scrape_metrics(client, f"{node.url}/metrics") for node in fleet.workers
    }
    return workers, [await scrape_metrics(client, f"{node.url}/metrics") for node in fleet.apis]


def _counted(before: Samples, after: Samples) -> Samples:
    """What the counters counted in between (the fleet may have run other tests' tasks before)."""
    return {key: value - before.get(key, 0) for key, value in after.items()}


async def test_cancel_through_one_node_stops_a_task_running_on_any_worker(shared_fleet: Fleet) -> None:
    fleet = shared_fleet
    async with fleet.client(0) as one, fleet.client(1) as two:
        long = {"prompt": "long", "width": 64, "height": 64, "steps": 150}
        task = (await one.post("/v1/generations", json=long)).json()
        with anyio.fail_after(30):
            while (await two.get(f"/v1/generations/{task['id']}")).json()["progress"] is None:
                await anyio.sleep(0.05)
        other = (await one.post("/v1/generations", json={"prompt": "other", **SMALL})).json()
        cancelled = await two.post(f"/v1/generations/{task['id']}/cancel")
        assert cancelled.json()["state"] == "cancelled", cancelled.text
        final = await wait_final(one, task["id"])
        assert final["state"] == "cancelled" and final["progress"] is None
        assert (await wait_final(two, other["id"]))["state"] == "succeeded"


async def test_a_plan_limits_an_owner_across_every_node(shared_fleet: Fleet) -> None:
    fleet = shared_fleet
    async with fleet.client(0, "tia") as one, fleet.client(1, "tia") as two:
        answers = [await (one, two)[i % 2].post("/v1/generations", json={"prompt": "x", **SMALL}) for i in range(8)]
        codes = [answer.status_code for answer in answers]
        assert codes.count(202) == 5 and codes.count(429) == 3, codes
        for answer in answers:  # the fleet is shared: leave nothing behind
            if answer.status_code == 202:
                assert (await wait_final(one, answer.json()["id"]))["state"] == "succeeded"


async def test_models_loaded_through_one_node_show_as_held_by_the_workers_on_the_other(shared_fleet: Fleet) -> None:
    fleet = shared_fleet
    async with fleet.client(0, "root") as one, fleet.client(1, "root") as two:

        async def holders() -> set[str]:
            models = (await two.get("/v1/models")).json()["items"]
            default = next(model for model in models if model["default"])
            return {device["device"].split("/")[0] for device in default["devices"] if device["state"] == "loaded"}

        with anyio.fail_after(10):  # workers tell the fleet what they hold every second
            while await holders() != {"w1", "w2"}:
                await anyio.sleep(0.2)
        loaded = await one.post("/v1/models/tiny-sdxl/load")
        assert loaded.status_code == 200, loaded.text
        assert {device["device"] for device in loaded.json()["devices"]} == {"w1/cpu", "w2/cpu"}
        unloading_the_default = await two.post("/v1/models/tiny-sdxl/unload")
        assert unloading_the_default.status_code == 409

    # An A1111 client picks its model once, through whichever node the balancer gives it; every node keeps it.
    ann = httpx.BasicAuth("ann", fleet.tokens["ann"])
    async with httpx.AsyncClient(base_url=fleet.apis[0].url, auth=ann, timeout=60) as one:
        assert (await one.post("/sdapi/v1/options", json={"sd_model_checkpoint": "second"})).status_code == 200
    async with httpx.AsyncClient(base_url=fleet.apis[1].url, auth=ann, timeout=60) as two:
        assert (await two.get("/sdapi/v1/options")).json()["sd_model_checkpoint"] == "second"
        made = await two.post("/sdapi/v1/txt2img", json={"prompt": "a knight", "width": 64, "height": 64, "steps": 2})
        assert made.status_code == 200, made.text
        task_id = json.loads(made.json()["info"])["task_ids"][0]
    async with fleet.client(0, "ann") as one:
        assert (await one.get(f"/v1/generations/{task_id}")).json()["request"]["model"] == "second"


async def test_worker_kills_lose_no_task(fleet: Fleet) -> None:
    """kill -9 a worker at 5 random moments while 30 tasks run, restarting it each time."""
    rng = random.Random(7)
    async with fleet.client(0) as one:
        ids = []
        for index in range(30):
            response = await one.post(
                "/v1/generations", json={"prompt": f"k{index}", "width": 64, "height": 64, "steps": 8}
            )
            assert response.status_code == 202
            ids.append(response.json()["id"])
        for _ in range(5):
            await anyio.sleep(rng.uniform(0.2, 1.5))
            victim = rng.randrange(2)
            await fleet.workers[victim].kill()
            await fleet.workers[victim].start()
        views = [await wait_final(one, task_id, timeout_s=180) for task_id in ids]
    states = Counter(str(view["state"]) for view in views)
    attempts = Counter(int(view["attempt"]) for view in views)  # type: ignore[call-overload]
    print("worker kills: states", dict(states), "attempts", dict(attempts))
    assert set(states) <= {"succeeded", "failed", "cancelled"} and sum(states.values()) == 30
    for view in views:
        if view["state"] == "succeeded":
            assert len(view["images"]) == 1  # type: ignore[arg-type]
        else:
            assert view["error"]["code"] == "worker_lost"  # type: ignore[index]
    assert max(attempts) > 1, "some task should have been taken from a killed worker"


async def test_a_burst_through_both_api_nodes_is_accepted_or_refused_and_kept(fleet: Fleet) -> None:
    """8 clients, 320 submits spread over both API nodes while the workers run: each is accepted or refused as
    queue_full, both nodes keep answering, and after one API node is killed the other lists every accepted
    task, each client's in the order it submitted them."""
    burst = await submit_burst(
        lambda index: fleet.client(index % 2),
        8,
        40,
        lambda index, n: {"prompt": f"burst {index}-{n}", "seed": index * 1000 + n, **SMALL},
    )
    print("fleet burst: accepted", burst.total_accepted, "refused", burst.refused)
    for node in (0, 1):
        async with fleet.client(node) as client:
            some = burst.accepted[node][-1]
            assert (await client.get(f"/v1/generations/{some}")).json()["id"] == some
    await fleet.apis[0].kill()
    async with fleet.client(1) as client:
        tasks = await all_tasks(client)
    burst.assert_kept_in_order(tasks)


def jwt_token(owner: str, plan: str) -> str:
    """A caller whose identity needs no store: each route below then reaches its own part of Redis."""
    claims = {"sub": owner, "aud": "chara-forge", "exp": int(time.time()) + 600, "plan": plan}
    return jwt.encode(claims, JWT_SECRET, algorithm="HS256")


async def test_redis_killed_with_work_queued_and_running_loses_nothing(fleet: Fleet) -> None:
    jay = {"Authorization": f"Bearer {jwt_token('jay', 'unlimited')}"}
    async with fleet.client(0) as one, fleet.client(1) as two:
        async with httpx.AsyncClient(base_url=fleet.apis[1].url, headers=jay, timeout=30) as as_jay:
            finished = await as_jay.post("/v1/generations", json={"prompt": "kept", "seed": 5, **SMALL})
            done = await wait_final(as_jay, finished.json()["id"])
        ids = []
        for index in range(10):
            response = await one.post(
                "/v1/generations", json={"prompt": f"r{index}", "width": 64, "height": 64, "steps": 10}
            )
            assert response.status_code == 202
            ids.append(response.json()["id"])
        await anyio.sleep(0.3)
        await fleet.redis.kill()
        refused = await two.post("/v1/generations", json={"prompt": "during", **SMALL})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "store_unavailable", refused.text
        assert refused.headers["Retry-After"]
        # One route of each family that reads or writes Redis during a request: all 503 with Retry-After, quickly.
        png = io.BytesIO()
        Image.new("RGB", (64, 64)).save(png, format="PNG")
        tia = {"Authorization": f"Bearer {jwt_token('tia', 'trial')}"}
        calls = {
            "result cache": two.post("/v1/generations", json={"prompt": "kept", "seed": 5, **SMALL}, headers=jay),
            "keys": two.get("/v1/generations"),
            "characters": two.get("/v1/characters", headers=jay),
            "uploads": two.post("/v1/uploads", content=png.getvalue(), headers={**jay, "Content-Type": "image/png"}),
            "callers' models": two.get("/sdapi/v1/options", headers=jay),
            "rate limits": two.post("/v1/generations", json={"prompt": "limited", **SMALL}, headers=tia),
            "files": two.get(str(done["images"][0]["url"]), headers=jay),  # type: ignore[index]
            "tasks": two.get(f"/v1/generations/{ids[0]}", headers=jay),
        }
        for family, call in calls.items():
            with anyio.fail_after(10):
                response = await call
            assert response.status_code == 503, (family, response.status_code, response.text)
            assert "store_unavailable" in response.text and response.headers["Retry-After"], (family, response.text)
        events_url = f"ws{fleet.apis[1].url[4:]}/v1/generations/{ids[0]}/events"
        with anyio.fail_after(10):
            async with aconnect_ws(events_url, two, headers=jay) as ws:
                assert json.loads(await ws.receive_text())["error"]["code"] == "store_unavailable"
        with anyio.fail_after(5):  # readiness follows the store within a ping (every second)
            while (await two.get("/readyz")).status_code != 503:
                await anyio.sleep(0.1)
        await fleet.redis.restart()
        views = [await wait_final(one, task_id, timeout_s=120) for task_id in ids]
        assert {view["state"] for view in views} == {"succeeded"}, views
        with anyio.fail_after(20):
            while (await two.get("/readyz")).status_code != 200:
                await anyio.sleep(0.2)


async def test_long_tasks_keep_their_claim_and_a_high_priority_task_jumps_the_fleet_queue(shared_fleet: Fleet) -> None:
    fleet = shared_fleet
    async with fleet.client(0) as one, fleet.client(1) as two:
        slow = {"prompt": "slow", "width": 192, "height": 192, "steps": 150}
        long = [(await one.post("/v1/generations", json=slow)).json() for _ in range(2)]
        with anyio.fail_after(30):  # both workers busy
            while "queued" in [(await one.get(f"/v1/generations/{t['id']}")).json()["state"] for t in long]:
                await anyio.sleep(0.05)
        normal = [
            (await (one, two)[i % 2].post("/v1/generations", json={"prompt": f"n{i}", **SMALL})).json()
            for i in range(6)
        ]
        assert [task["position"] for task in normal] == list(range(6))
        urgent = (await two.post("/v1/generations", json={"prompt": "urgent", "priority": 10, **SMALL})).json()
        assert urgent["position"] == 0
        assert (await one.get(f"/v1/generations/{normal[0]['id']}")).json()["position"] == 1
        views = {t["id"]: await wait_final(one, t["id"]) for t in [*long, *normal, urgent]}
    assert {view["state"] for view in views.values()} == {"succeeded"}
    for task in long:  # longer than claim_timeout_s on a live worker: run once
        view = views[task["id"]]
        assert view["attempt"] == 1 and view["timings"]["running_s"] > 3, view["timings"]  # type: ignore[index]
    assert all(views[urgent["id"]]["started_at"] <= views[t["id"]]["started_at"] for t in normal)  # type: ignore[operator]


async def test_a_task_that_kills_its_worker_every_time_fails_and_blocks_nothing(fleet: Fleet) -> None:
    async with fleet.client(0) as one:
        poison = (
            await one.post("/v1/generations", json={"prompt": "poison", "width": 192, "height": 192, "steps": 150})
        ).json()
        later = [(await one.post("/v1/generations", json={"prompt": f"later {i}", **SMALL})).json() for i in range(5)]
        kills = 0
        with anyio.fail_after(120):
            while (view := (await one.get(f"/v1/generations/{poison['id']}")).json())["state"] not in FINAL_STATES:
                if view["state"] == "running" and view["worker"]:
                    worker = next(w for w in fleet.workers if w.env["FORGE_NODE_NAME"] == view["worker"])
                    await worker.kill()
                    kills += 1
                    await worker.start()
                await anyio.sleep(0.05)
        assert view["state"] == "failed" and view["error"]["code"] == "worker_lost" and view["attempt"] == 3, view
        assert kills == 3
        assert {(await wait_final(one, t["id"]))["state"] for t in later} == {"succeeded"}


async def test_a_client_whose_api_node_dies_follows_its_task_on_the_other(fleet: Fleet) -> None:
    async with fleet.client(0) as one, fleet.client(1) as two:
        task = (
            await one.post("/v1/generations", json={"prompt": "followed", "width": 64, "height": 64, "steps": 120})
        ).json()
        path = task["links"]["events"]
        before: list[str] = []
        try:
            async with aconnect_ws(fleet.apis[0].url.replace("http", "ws") + path, one) as ws:
                while "progress" not in before:
                    before.append(json.loads(await ws.receive_text())["type"])
                await fleet.apis[0].kill()
                while True:
                    await ws.receive_text()
        except Exception:  # the node is gone mid-stream
            pass
        after: list[dict[str, str]] = []
        async with aconnect_ws(fleet.apis[1].url.replace("http", "ws") + path, two) as ws:
            while not after or after[-1]["type"] not in ("succeeded", "failed", "cancelled"):
                after.append(json.loads(await ws.receive_text()))
    assert after[0]["type"] == "started" and after[0]["worker"] in {"w1", "w2"}, after[:2]  # the state first
    assert after[-1]["type"] == "succeeded" and any(event["type"] == "progress" for event in after)


async def test_a_task_joins_the_step_level_batch_running_on_a_worker(fleet: Fleet) -> None:
    """A GPU worker's default: a task queued while a batch runs joins it at the next step, claimed from the
    fleet's queue, and its image is the one it gets alone."""
    for idle in fleet.workers:  # they hold no claim: nothing is lost
        await idle.kill()
    stepping = fleet.worker("w3", max_batch="4", batch_wait_ms="0")
    fleet.workers.append(stepping)
    await stepping.start()
    duel = {"prompt": "a quick duel", "width": 64, "height": 64, "steps": 4, "seed": 2, "scheduler": "euler_a"}
    async with fleet.client(0) as one, fleet.client(1) as two, fleet.client(1, "bob") as bob:
        long = (await one.post("/v1/generations", json={**SMALL, "prompt": "a long march", "steps": 150})).json()
        with anyio.fail_after(60):
            while not ((await two.get(f"/v1/generations/{long['id']}")).json()["progress"] or {}).get("step", 0) >= 2:
                await anyio.sleep(0.05)
        short = (await two.post("/v1/generations", json=duel)).json()
        joined = await wait_final(two, short["id"])
        assert joined["state"] == "succeeded" and joined["worker"] == "w3"
        # One worker with one device: the short task ran inside the long one's batch, which goes on.
        assert (await one.get(f"/v1/generations/{long['id']}")).json()["state"] == "running"
        assert (await one.post(f"/v1/generations/{long['id']}/cancel")).status_code in (200, 202)
        assert (await wait_final(one, long["id"]))["state"] == "cancelled"
        alone = await wait_final(bob, (await bob.post("/v1/generations", json=duel)).json()["id"])  # no shared cache
        assert alone["state"] == "succeeded"
        pixels = [
            np.asarray(Image.open(io.BytesIO((await client.get(view["images"][0]["url"])).content)).convert("RGB"))  # type: ignore[index]
            for client, view in ((two, joined), (bob, alone))
        ]
    assert np.abs(pixels[0].astype(int) - pixels[1].astype(int)).max() <= 4
