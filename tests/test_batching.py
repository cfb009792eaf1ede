"""Dynamic batching: compatible tasks share one UNet batch, each keeping its own prompt, seeds and progress."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
from httpx_ws import aconnect_ws

from actors.sqlite_store import SqliteStore as Store
from engines.eager import EagerEngine
from engines.models import resolve_model
from forge.engine import Job
from forge.tasks import TaskState
from tests.conftest import RunningServer, server_config, start_server
from tests.helpers import generate_pixels, submit, wait_for_state

pytestmark = pytest.mark.anyio

# One pixel level of 255: the batched UNet sums in another order than a lone one.
PIXEL_TOLERANCE = 2


def _max_difference(a: Any, b: Any) -> int:
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


@pytest.mark.parametrize("sampler", ["euler", "euler_a", "dpmpp_2m"])
async def test_a_batch_gives_each_job_the_images_it_gets_alone(tiny_model: Path, sampler: str) -> None:
    model = resolve_model(str(tiny_model), tiny_model.parent, 1)
    engine = EagerEngine(model, "cpu")

    def job(prompt: str, seeds: list[int], guidance: float, negative: str = "") -> Job:
        return Job(model=model, prompt=prompt, negative_prompt=negative, width=64, height=64, seeds=seeds, steps=4,
                   guidance_scale=guidance, scheduler=sampler)  # fmt: skip

    # Each with its own guidance scale too: classifier-free guidance is applied row by row.
    jobs = [job("a knight", [1, 2], 5.0), job("a wizard", [7], 7.5, "blurry"), job("an elf archer", [3], 3.0)]
    together = engine.run_batch(jobs)
    assert [len(result.images) for result in together] == [2, 1, 1]
    for one, result in zip(jobs, together, strict=True):
        alone = engine.run(one)
        for image_alone, image_batched in zip(alone.images, result.images, strict=True):
            assert _max_difference(image_alone, image_batched) <= PIXEL_TOLERANCE
    # and the rows are really each job's own: different prompts and seeds give different images
    assert _max_difference(together[0].images[0], together[1].images[0]) > 20
    assert _max_difference(together[0].images[0], together[0].images[1]) > 20
    # and each row's scale is its own: the elf at the knight's scale is another image
    elf_at_5 = engine.run(job("an elf archer", [3], 5.0)).images[0]
    assert _max_difference(elf_at_5, together[2].images[0]) > 2 * PIXEL_TOLERANCE


def test_a_batch_of_prompts_of_several_lengths_runs_a_part_per_length(tiny_model: Path) -> None:
    """Rows of one UNet batch need prompts of as many 77-token chunks: a request-level batch runs a part per
    length, each job getting its solo images (a long prompt, a weighted one, a plain one, another clip skip)."""
    model = resolve_model(str(tiny_model), tiny_model.parent, 1)
    engine = EagerEngine(model, "cpu")
    long = "a knight in silver armour, " * 8 + "with a long sword and a shield"  # 200 tokens: 3 chunks

    def job(prompt: str, seed: int, **fields: Any) -> Job:
        return Job(model=model, prompt=prompt, negative_prompt="", width=64, height=64, seeds=[seed], steps=2,
                   guidance_scale=5.0, scheduler="euler", **fields)  # fmt: skip

    jobs = [job(long, 1), job("a (red:1.3) [hooded] wizard", 2), job("an elf", 3, clip_skip=1), job(long, 4)]
    rows: list[int] = []
    hook = engine.pipe.unet.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        together = engine.run_batch(jobs)
    finally:
        hook.remove()
    assert rows == [4, 4, 4, 4]  # two parts of two jobs (guided: two rows each), two steps each
    for one, result in zip(jobs, together, strict=True):
        assert _max_difference(engine.run(one).images[0], result.images[0]) <= PIXEL_TOLERANCE


def test_a_unet_that_embeds_its_guidance_gets_a_batch_per_scale(tiny_model: Path) -> None:
    """Guidance-distilled UNets (LCM) take one scale for the whole batch as an input, so rows cannot differ."""
    import torch
    from diffusers import UNet2DConditionModel

    model = resolve_model(str(tiny_model), tiny_model.parent, 1)
    engine = EagerEngine(model, "cpu")
    torch.manual_seed(0)
    config = {**engine.pipe.unet.config, "time_cond_proj_dim": 32}
    engine.pipe.unet = UNet2DConditionModel.from_config(config)
    with torch.no_grad():  # a random embedding of the scale barely moves the image; make it count
        engine.pipe.unet.time_embedding.cond_proj.weight.mul_(100)

    def job(prompt: str, seed: int, guidance: float) -> Job:
        return Job(model=model, prompt=prompt, negative_prompt="", width=64, height=64, seeds=[seed], steps=3,
                   guidance_scale=guidance, scheduler="euler")  # fmt: skip

    jobs = [job("a knight", 1, 8.0), job("a wizard", 2, 2.0), job("a bard", 3, 8.0)]
    together = engine.run_batch(jobs)
    for one, result in zip(jobs, together, strict=True):
        assert _max_difference(engine.run(one).images[0], result.images[0]) <= PIXEL_TOLERANCE
    assert _max_difference(engine.run(job("a wizard", 2, 8.0)).images[0], together[1].images[0]) > 5


@pytest.fixture
async def batching_server(tmp_path: Path, tiny_model: Path) -> AsyncIterator[RunningServer]:
    """Request-level batching (step-level has its own tests), and no result cache: a task run again to compare
    is run again."""
    config = server_config(
        tmp_path / "data", tiny_model, max_batch=4, batch_wait_ms=0, batching="request", result_cache=False
    )
    async for running in start_server(config):
        yield running


async def _events(server: RunningServer, task: dict[str, Any]) -> list[dict[str, Any]]:
    """Every event of a task, from subscribing until its final one."""
    events = []
    async with aconnect_ws(f"{server.ws_url}{task['links']['events']}", server.client) as ws:
        while True:
            events.append(json.loads(await ws.receive_text()))
            if events[-1]["type"] in {"succeeded", "failed", "cancelled"}:
                return events


async def _run_while_busy(server: RunningServer, requests: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Submit `requests` while the engine works on something else, so they queue up together; return each
    one's events."""
    blocker = await submit(server.client, prompt="blocker", width=256, height=256, steps=10)
    await wait_for_state(server.client, blocker["id"], {"running"})
    tasks = [await submit(server.client, **request) for request in requests]
    results: list[list[dict[str, Any]]] = [[] for _ in tasks]

    async def collect(index: int) -> None:
        results[index] = await _events(server, tasks[index])

    async with anyio.create_task_group() as tg:
        for index in range(len(tasks)):
            tg.start_soon(collect, index)
    return results


async def test_compatible_requests_share_a_batch_and_keep_their_own_images(batching_server: RunningServer) -> None:
    server = batching_server
    common = {"width": 64, "height": 64, "steps": 6, "guidance_scale": 5.0}
    requests = [
        {"prompt": "a knight", "seed": 11, "num_images": 2, **common},
        {"prompt": "a wizard", "negative_prompt": "blurry", "seed": 22, **{**common, "guidance_scale": 7.5}},
        {"prompt": "a dwarf", "seed": 33, **{**common, "steps": 5}},  # not compatible: runs apart
        {"prompt": "an elf", "seed": 44, **common},
        {"prompt": "a bard", "seed": 55, **{**common, "guidance_scale": 1.0}},  # no guidance at all: apart
    ]
    events = await _run_while_busy(server, requests)

    started = [next(e for e in task_events if e["type"] == "started") for task_events in events]
    assert [s["batch"] for s in started] == [3, 3, 1, 3, 1]
    for index, task_events in enumerate(events):
        steps = [e["step"] for e in task_events if e["type"] == "progress"]
        assert task_events[-1]["type"] == "succeeded"
        assert steps and steps[-1] == requests[index]["steps"], "each task reports its own progress"

    batched = [await wait_for_state(server.client, e[-1]["task_id"]) for e in events]
    assert batched[0]["seeds"] == [11, 12]
    for request, view in zip(requests, batched, strict=True):
        for index, link in enumerate(view["images"]):
            _, alone = await generate_pixels(server.client, **{**request, "seed": view["seeds"][index],
                                                                       "num_images": 1})  # fmt: skip
            png = (await server.client.get(link["url"])).content
            assert _max_difference(alone, _decode(png)) <= PIXEL_TOLERANCE, (request, index)

    metrics = (await server.client.get("/metrics")).text
    assert 'chara_forge_batch_tasks_bucket{le="3.0"}' in metrics


def _decode(png: bytes) -> Any:
    import io

    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGB"))


async def test_cancelling_one_task_of_a_batch_leaves_the_others(batching_server: RunningServer) -> None:
    server = batching_server
    blocker = await submit(server.client, prompt="blocker", width=256, height=256, steps=10)
    await wait_for_state(server.client, blocker["id"], {"running"})
    common = {"width": 128, "height": 128, "steps": 40}
    tasks = [await submit(server.client, prompt=f"hero {n}", seed=n, **common) for n in range(3)]
    await wait_for_state(server.client, tasks[1]["id"], {"running"})
    response = await server.client.post(tasks[1]["links"]["cancel"])
    assert response.status_code < 300, response.text
    # it ends at once, while the other two are still denoising
    cancelled = await wait_for_state(server.client, tasks[1]["id"], timeout_s=5)
    assert cancelled["state"] == "cancelled"
    others = [(await server.client.get(f"/v1/generations/{tasks[n]['id']}")).json() for n in (0, 2)]
    assert [view["state"] for view in others] == ["running", "running"]
    for n in (0, 2):
        view = await wait_for_state(server.client, tasks[n]["id"])
        assert view["state"] == "succeeded" and len(view["images"]) == 1


async def test_a_lone_task_waits_for_company_only_until_other_work_arrives(tmp_path: Path, tiny_model: Path) -> None:
    config = server_config(tmp_path / "data", tiny_model, max_batch=4, batch_wait_ms=2500, batching="request")
    async for server in start_server(config):
        lone = await submit(server.client, prompt="lone", width=64, height=64, steps=2)
        await anyio.sleep(0.3)
        other = await submit(server.client, prompt="other", width=64, height=64, steps=3)  # not compatible
        views = [await wait_for_state(server.client, task["id"]) for task in (lone, other)]
        assert [view["state"] for view in views] == ["succeeded", "succeeded"]
        # the window closed when incompatible work arrived, not after its 2.5 s
        assert views[0]["timings"]["queued_s"] < 1.5
        # and company that arrives within the window joins the batch, which goes when the window closes
        first = await submit(server.client, prompt="first", width=64, height=64, steps=2)
        second = await submit(server.client, prompt="second", width=64, height=64, steps=2)
        events = await _events(server, second)
        assert next(e for e in events if e["type"] == "started")["batch"] == 2
        view = await wait_for_state(server.client, first["id"])
        assert view["state"] == "succeeded" and 2.0 < view["timings"]["queued_s"] < 6.0


async def test_two_engines_share_the_queue(tmp_path: Path, tiny_model: Path) -> None:
    config = server_config(tmp_path / "data", tiny_model, devices="cpu:0,cpu:1", cpu_threads=1)
    async for server in start_server(config):
        busy = await submit(server.client, prompt="long", width=512, height=512, steps=150)
        await wait_for_state(server.client, busy["id"], {"running"})
        # while one engine is busy, the next task goes to the other one rather than waiting
        other = await submit(server.client, prompt="short", width=64, height=64, steps=2)
        events = await _events(server, other)
        assert events[-1]["type"] == "succeeded"
        async with aconnect_ws(f"{server.ws_url}{busy['links']['events']}", server.client) as ws:
            busy_started = json.loads(await ws.receive_text())
        assert (await server.client.post(busy["links"]["cancel"])).status_code < 300
        other_devices = {e["device"] for e in events if e["type"] == "started"}
        assert {busy_started["device"], *other_devices} == {"cpu:0", "cpu:1"}


async def test_a_watcher_arriving_while_a_task_is_handed_to_an_engine_learns_its_device(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Hold the scheduler between committing `running` and handing the task to its engine.
    handed_over = anyio.Event()
    committed = anyio.Event()
    transition = Store.transition

    async def held_transition(self: Store, task_id: str, **kwargs: Any) -> bool:
        moved = await transition(self, task_id, **kwargs)
        if kwargs["to"] is TaskState.RUNNING:
            committed.set()
            await handed_over.wait()
        return bool(moved)

    monkeypatch.setattr(Store, "transition", held_transition)
    task = await submit(server.client, prompt="hero", width=64, height=64, steps=2)
    await committed.wait()
    async with aconnect_ws(f"{server.ws_url}{task['links']['events']}", server.client) as ws:
        with anyio.move_on_after(0.5):
            pytest.fail(f"an event before the task reached its engine: {await ws.receive_text()}")
        handed_over.set()
        started = json.loads(await ws.receive_text())
    assert started["type"] == "started" and started["device"] == "cpu" and started["batch"] == 1
