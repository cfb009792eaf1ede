"""Step-level batching: tasks with their own steps, samplers and guidance share each UNet call, join a running
batch at its next step and leave when done, each getting the images it gets alone."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
import torch

from engines.eager import EagerEngine
from engines.models import tiny_info
from engines.step_loop import StepLoop
from forge.engine import GenerationResult, Hires, Job, JobCancelled, OutOfMemory
from tests.conftest import RunningServer, server_config, start_server
from tests.helpers import submit, wait_for_state
from tests.test_batching import _events
from tests.test_metrics import _scrape

pytestmark = pytest.mark.anyio

# The tolerance the compiled engines are held to on the tiny model; the UNet's sums run in another order
# in a batch of another size.
TOLERANCE = 4


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> EagerEngine:
    return EagerEngine(tiny_info(tiny_model), "cpu")


def job(engine: EagerEngine, seed: int, steps: int, sampler: str, guidance: float, **fields: Any) -> Job:
    base: dict[str, Any] = dict(
        model=engine.model, prompt="a knight", negative_prompt="", width=64, height=64, seeds=[seed], steps=steps,
        guidance_scale=guidance, scheduler=sampler,
    )  # fmt: skip
    return Job(**(base | fields))


def difference(result: GenerationResult, alone: GenerationResult) -> int:
    return max(
        int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())
        for a, b in zip(result.images, alone.images, strict=True)
    )


def run_loop(engine: EagerEngine, jobs: list[Job], joiners: Any = None, **options: Any) -> dict[int, Any]:
    outcomes: dict[int, Any] = {}
    StepLoop(engine.pipe).run(
        jobs, lambda done, outcome: outcomes.__setitem__(id(done), outcome), joiners or (lambda free: []), **options
    )
    return outcomes


def test_mixed_steps_samplers_and_guidance_and_a_late_joiner_each_match_their_solo_images(
    engine: EagerEngine,
) -> None:
    jobs = [
        job(engine, 1, 4, "euler", 5.0, seeds=[1, 2]),
        job(engine, 2, 6, "euler_a", 7.5, prompt="a wizard", negative_prompt="blurry"),
        job(engine, 3, 3, "dpmpp_2m_karras", 3.0),
        job(engine, 4, 5, "unipc", 1.0),  # no guidance: one row a step instead of two
    ]
    late = job(engine, 9, 4, "ddim", 6.0, prompt="a rogue")
    boundaries = []

    def joiners(free: int) -> list[Job]:
        boundaries.append(free)
        return [late] if len(boundaries) == 3 else []  # joins at the third step

    outcomes = run_loop(engine, jobs, joiners, max_images=8)
    for one in [*jobs, late]:
        assert difference(outcomes[id(one)], engine.run(one)) <= TOLERANCE, one.scheduler
    # Room before each step: the joiner took one image's place and the three-step task gave one back; after
    # four steps the two-image task left too.
    assert boundaries[:5] == [3, 3, 3, 3, 5]


def test_long_weighted_and_plain_prompts_and_clip_skips_share_a_step_batch_each_with_its_solo_image(
    engine: EagerEngine,
) -> None:
    """Rows of one UNet call need prompts of as many 77-token chunks: the step runs one call per length, so a
    200-token prompt, a weighted one, a plain one and another clip skip each get their solo image."""
    long = "a knight in silver armour, " * 8 + "with a long sword and a shield"  # 200 tokens: 3 chunks
    jobs = [
        job(engine, 1, 3, "euler", 5.0, prompt=long, negative_prompt="blurry"),
        job(engine, 2, 4, "euler_a", 6.0, prompt="a (red:1.3) [hooded] ((wizard))"),
        job(engine, 3, 3, "euler", 5.0, seeds=[3, 4]),
        job(engine, 5, 2, "dpmpp_2m", 4.0, prompt="a bard BREAK lute", clip_skip=1),  # 2 chunks
        job(engine, 6, 3, "euler", 5.0, prompt=long[:-6] + "helmet", negative_prompt="lowres"),
    ]
    calls: list[tuple[int, int]] = []  # (rows, tokens) of each UNet call
    unet = engine.pipe.unet
    hook = unet.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs["encoder_hidden_states"].shape[:2]), with_kwargs=True
    )
    try:
        outcomes = run_loop(engine, jobs, max_images=8)
    finally:
        hook.remove()
    for one in jobs:
        assert difference(outcomes[id(one)], engine.run(one)) <= TOLERANCE, one.prompt
    assert calls[0] == (4, 231) and (6, 77) in calls and (2, 154) in calls  # the two long prompts shared theirs


def test_a_hires_second_pass_and_guidance_rescale_match_their_solo_images(engine: EagerEngine) -> None:
    """The hires fix's second pass joins the loop at its own size once the first pass is done; its UNet calls are
    its size's, and the plain task beside it goes on at the base size."""
    hires = Hires(upscaler="latent", upscale_width=128, upscale_height=96, width=128, height=96, steps=2, denoise=0.5)
    jobs = [
        job(engine, 1, 3, "euler_a", 5.0, hires=hires, guidance_rescale=0.7, width=64, height=48),
        job(engine, 2, 5, "dpmpp_2m", 6.0, guidance_rescale=0.3, width=64, height=48),
    ]
    outcomes = run_loop(engine, jobs, max_images=4)
    assert outcomes[id(jobs[0])].images[0].size == (128, 96)
    for one in jobs:
        assert difference(outcomes[id(one)], engine.run(one)) <= TOLERANCE, one.scheduler


def test_a_unet_that_embeds_its_guidance_gets_each_rows_scale_in_one_step_batch(tiny_model: Path) -> None:
    """Guidance-distilled UNets (LCM) take the scale as an input with one row each, so tasks with different
    scales share a step batch and each gets its own scale's image."""
    from diffusers import UNet2DConditionModel

    distilled = EagerEngine(tiny_info(tiny_model), "cpu")
    torch.manual_seed(0)
    distilled.pipe.unet = UNet2DConditionModel.from_config({**distilled.pipe.unet.config, "time_cond_proj_dim": 32})
    with torch.no_grad():  # a random embedding of the scale barely moves the image; make it count
        distilled.pipe.unet.time_embedding.cond_proj.weight.mul_(100)
    strong, weak = job(distilled, 1, 3, "euler", 8.0), job(distilled, 2, 4, "euler", 2.0)
    outcomes = run_loop(distilled, [strong, weak])
    for one in (strong, weak):
        assert difference(outcomes[id(one)], distilled.run(one)) <= TOLERANCE
    assert difference(outcomes[id(weak)], distilled.run(job(distilled, 2, 4, "euler", 8.0))) > 5


def test_an_fp16_vae_that_decodes_in_fp32_is_left_in_fp16_for_the_next_task(tiny_model: Path) -> None:
    """SDXL's VAE is fp16 but decodes in fp32 (force_upcast), as the pipeline runs it: a step batch's decodes
    put the shared VAE back in fp16, so every later decode, in a step batch or the pipeline, works too."""
    half = EagerEngine(tiny_info(tiny_model), "cpu")
    half.pipe.to(torch.float16)
    half.pipe.vae.register_to_config(force_upcast=True)
    pair, single = job(half, 1, 3, "euler", 5.0, seeds=[1, 2]), job(half, 3, 4, "euler_a", 6.0)
    outcomes = run_loop(half, [pair, single])
    assert half.pipe.vae.dtype == torch.float16
    for one in (pair, single):
        alone = half.run(one)
        assert difference(outcomes[id(one)], alone) <= TOLERANCE
        assert all(np.asarray(image).std() > 1 for image in alone.images)  # real pictures, not a blank


def test_out_of_memory_shrinks_the_step_and_fails_no_innocent_task(
    engine: EagerEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    unet = engine.pipe.unet
    forward = unet.forward

    def limited(sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if sample.shape[0] > 2:  # room for one guided image
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(sample, *args, **kwargs)

    jobs = [job(engine, seed, 3, "euler", 5.0) for seed in (1, 2, 3)]
    alone = [engine.run(one) for one in jobs]
    monkeypatch.setattr(unet, "forward", limited)
    outcomes = run_loop(engine, jobs)
    for one, solo in zip(jobs, alone, strict=True):
        assert difference(outcomes[id(one)], solo) <= TOLERANCE
    too_big = job(engine, 5, 3, "euler", 5.0, seeds=[5, 6])  # alone it needs four rows
    assert isinstance(run_loop(engine, [too_big])[id(too_big)], OutOfMemory)


def test_a_cancelled_task_leaves_at_the_next_step_and_the_others_go_on(engine: EagerEngine) -> None:
    steps_seen: list[int] = []
    doomed = job(engine, 1, 8, "euler", 5.0)
    kept = job(engine, 2, 4, "euler", 5.0)

    def on_progress(step: int, total: int, preview: Any) -> None:
        steps_seen.append(step)
        if step == 2:
            doomed.cancel.set("cancelled")

    watched = Job(**{**doomed.__dict__, "on_progress": on_progress, "cancel": doomed.cancel})
    outcomes = run_loop(engine, [watched, kept])
    assert isinstance(outcomes[id(watched)], JobCancelled) and max(steps_seen) == 2
    assert difference(outcomes[id(kept)], engine.run(kept)) <= TOLERANCE


@pytest.fixture
async def step_server(tmp_path: Path, tiny_model: Path) -> AsyncIterator[RunningServer]:
    """Step-level batching of up to 4 images (a GPU's default; off on a CPU otherwise), no result cache."""
    config = server_config(tmp_path / "data", tiny_model, max_batch=4, batch_wait_ms=0, result_cache=False)
    async for running in start_server(config):
        yield running


async def _started(server: RunningServer, task_id: str) -> dict[str, Any]:
    return await wait_for_state(server.client, task_id, {"running", "succeeded", "failed", "cancelled"})


async def _step_of(server: RunningServer, task_id: str, at_least: int) -> None:
    with anyio.fail_after(60):
        while True:
            view = (await server.client.get(f"/v1/generations/{task_id}")).json()
            if view["progress"] and view["progress"]["step"] >= at_least:
                return
            await anyio.sleep(0.02)


async def test_a_task_joins_the_running_batch_and_leaves_before_it(step_server: RunningServer) -> None:
    server = step_server
    long = await submit(server.client, prompt="a long march", steps=60, seed=1)
    await _step_of(server, long["id"], 2)
    short = await submit(server.client, prompt="a quick duel", steps=4, seed=2, scheduler="euler_a")
    events = await _events(server, short)  # watched: previews come too
    assert events[-1]["type"] == "succeeded"
    assert any(e["type"] == "progress" and e.get("preview_jpeg_b64") for e in events)
    long_view = (await server.client.get(f"/v1/generations/{long['id']}")).json()
    assert long_view["state"] == "running"  # the short one joined it, and is done while it goes on
    # /metrics shows how full the batch was, step by step: some steps denoised both tasks' images.
    samples = await _scrape(server)
    steps, one_image = (
        samples[("chara_forge_step_batch_images_count", ())],
        samples[("chara_forge_step_batch_images_bucket", (("le", "1.0"),))],
    )
    assert steps >= 2 + 4 and 4 <= steps - one_image < steps
    cancelled = await server.client.post(f"/v1/generations/{long['id']}/cancel")
    assert cancelled.status_code in (200, 202)
    assert (await wait_for_state(server.client, long["id"]))["state"] == "cancelled"
    again = await submit(server.client, prompt="a quick duel", steps=4, seed=2, scheduler="euler_a")
    assert (await wait_for_state(server.client, again["id"]))["state"] == "succeeded"
    joined, alone = await _image(server, short["id"]), await _image(server, again["id"])
    assert np.abs(joined.astype(int) - alone.astype(int)).max() <= TOLERANCE


async def _image(server: RunningServer, task_id: str) -> Any:
    import io

    from PIL import Image

    view = (await server.client.get(f"/v1/generations/{task_id}")).json()
    content = (await server.client.get(view["images"][0]["url"])).content
    with Image.open(io.BytesIO(content)) as image:
        return np.asarray(image.convert("RGB"))


async def test_a_task_of_another_size_is_not_starved(step_server: RunningServer) -> None:
    """Only the head of the queue joins a running batch: a task of another size at the head stops the
    joining, the batch drains, and the head runs next, before compatible tasks that came after it."""
    server = step_server
    first = await submit(server.client, prompt="a slow giant", steps=30, seed=1)
    await _step_of(server, first["id"], 1)
    other = await submit(server.client, prompt="a wide dragon", width=96, height=64, steps=3, seed=2)
    later = await submit(server.client, prompt="a squire", steps=3, seed=3)
    views = {name: await wait_for_state(server.client, task["id"]) for name, task in
             (("first", first), ("other", other), ("later", later))}  # fmt: skip
    assert all(view["state"] == "succeeded" for view in views.values())
    assert views["other"]["started_at"] <= views["later"]["started_at"]
    assert (
        views["later"]["started_at"] >= views["first"]["finished_at"]
        or views["later"]["started_at"] >= (views["other"]["started_at"])
    )


async def test_an_engine_that_runs_a_late_joiner_is_not_handed_another_batch(tmp_path: Path) -> None:
    """A batch may end just as the scheduler sends it a joiner: the engine runs the joiner as a new batch, so
    the scheduler must keep counting it busy, not hand it a batch of another size as well."""
    import msgspec

    from actors.hub import EventHub
    from actors.scheduler import Scheduler
    from actors.sqlite_store import SqliteStore
    from forge.batching import BatchPolicy
    from forge.messages import Dispatch, EngineIdle, EngineReady, SchedulerInbox, Submit
    from tests.test_store import OPEN, SPEC

    to_scheduler, inbox = anyio.create_memory_object_stream[SchedulerInbox](16)
    to_engine, engine_inbox = anyio.create_memory_object_stream[Dispatch](16)

    async def dispatched() -> list[str]:
        with anyio.fail_after(10):
            return [assignment.task.id for assignment in (await engine_inbox.receive()).batch]

    async with (
        to_scheduler,
        to_engine,
        engine_inbox,
        SqliteStore.open(tmp_path / "forge.sqlite3") as store,
        anyio.create_task_group() as tg,
    ):
        policy = BatchPolicy(max_images=4, step_level=True)
        scheduler = Scheduler(store, EventHub(), inbox, {"cpu": to_engine}, batching=policy)
        await tg.start(scheduler.run, [])
        await to_scheduler.send(EngineReady(device="cpu"))
        tasks = [
            await store.insert(owner="a", spec=msgspec.structs.replace(SPEC, **changes), admission=OPEN)
            for changes in ({}, {"steps": 5}, {"width": 128}, {})
        ]
        first, joiner, wide, later = tasks
        await to_scheduler.send(Submit(task=first))
        assert await dispatched() == [first.id]
        await to_scheduler.send(Submit(task=joiner))
        assert await dispatched() == [joiner.id]  # sent to join the running batch...
        await to_scheduler.send(EngineIdle(device="cpu", task_ids=[first.id]))  # ...which had just ended
        await to_scheduler.send(Submit(task=wide))
        await to_scheduler.send(Submit(task=later))
        await anyio.sleep(0.2)
        assert scheduler.statistics().engines_idle == 0 and scheduler.statistics().queued == 2
        await to_scheduler.send(EngineIdle(device="cpu", task_ids=[joiner.id]))
        assert await dispatched() == [wide.id]  # the head of the queue, not the later task of the old size
        tg.cancel_scope.cancel()
