"""Seamless tiles (`tiling`): circular padding in the UNet's and VAE's convolutions, per job, on a shared engine.

How seamlessness is measured (`seam_ratio`): for each pair of adjacent pixel columns (j, j+1) of an image,
the pair's decorrelation is 1 - the Pearson correlation of the two columns' values (every row, every RGB
channel). The wrap seam is the pair (last column, first column). Its ratio is the seam's decorrelation over
the median decorrelation of the interior pairs: about 1 when the image continues across its edges as it
does inside, well above 1 when the edge is a seam. Rows likewise. On the tiny random-weight model the
images are coloured noise with plaid structure: the plain per-pixel difference across a seam is no larger
than between interior neighbours (both are noise), but neighbouring columns inside still correlate, and
zero padding at an edge breaks that correlation. Measured on this model (64x64, 4 steps, seeds 0 to 7
through the engine): a wrapped axis 0.45 to 1.75 (mostly under 1.3), an unwrapped one 3.0 to 9.0 (mostly
over 5). The tests ask a wrapped axis for at most WRAPPED (1.5) and an unwrapped one for at least SEAM (3),
on seeds whose numbers are printed with -s.
"""

from __future__ import annotations

import dataclasses
import io
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from actors.encoding import read_parameters
from engines.eager import EagerEngine
from engines.models import tiny_info
from engines.step_loop import StepLoop
from engines.tiling import is_tiled, padded_convs, tiled
from forge.engine import Hires, Job
from tests.conftest import RunningServer, server_config, start_server
from tests.helpers import png_bytes, square_image, submit, wait_for_state

pytestmark = pytest.mark.anyio

WRAPPED = 1.5  # a wrapped axis' seam: at most this many times the interior's median decorrelation
SEAM = 3.0  # an unwrapped axis' seam: at least this many times
TOLERANCE = 4  # a step batch's images against the solo ones (the UNet's batch-size dependent rounding)
SMALL = {"prompt": "a mossy stone wall", "width": 64, "height": 64, "steps": 4}


def seam_ratio(pixels: np.ndarray, axis: int) -> float:
    """The wrap seam's decorrelation over the interior pairs' median (see the module docstring); axis 1:
    columns (the seam an `x` tile hides), axis 0: rows (`y`)."""
    lines = np.moveaxis(np.asarray(pixels, dtype=np.float64), axis, 0)  # lines[j]: column or row j
    flat = lines.reshape(lines.shape[0], -1)
    flat = flat - flat.mean(axis=1, keepdims=True)
    following = np.roll(flat, -1, axis=0)  # following[j] = line j+1; following[-1] = line 0 (the wrap)
    correlation = (flat * following).sum(axis=1) / np.sqrt((flat**2).sum(axis=1) * (following**2).sum(axis=1))
    decorrelation = 1 - correlation
    return float(decorrelation[-1] / np.median(decorrelation[:-1]))


def ratios(pixels: np.ndarray) -> tuple[float, float]:
    """(columns' seam ratio, rows' seam ratio)."""
    return seam_ratio(pixels, 1), seam_ratio(pixels, 0)


async def task_images(server: RunningServer, task: dict[str, Any]) -> tuple[dict[str, Any], list[np.ndarray]]:
    view = await wait_for_state(server.client, task["id"])
    assert view["state"] == "succeeded", view["error"]
    images = []
    for image in view["images"]:
        content = (await server.client.get(image["url"])).content
        with Image.open(io.BytesIO(content)) as opened:
            images.append(np.asarray(opened.convert("RGB")))
    return view, images


async def generate(server: RunningServer, **fields: Any) -> tuple[dict[str, Any], list[np.ndarray]]:
    return await task_images(server, await submit(server.client, **{**SMALL, **fields}))


async def parameters_of(server: RunningServer, view: dict[str, Any], index: int = 0) -> str:
    content = (await server.client.get(view["images"][index]["url"])).content
    with Image.open(io.BytesIO(content)) as image:
        return read_parameters(image) or ""


# -- through REST --


async def test_both_axes_wrap_and_an_untiled_image_has_seams(server: RunningServer) -> None:
    """`both`: each image's wrap seams, across its last and first column and its last and first row, are as
    smooth as its inside (seam ratio <= WRAPPED); the same seeds untiled have seams (>= SEAM) on both axes."""
    tiled_view, tiled_images = await generate(server, tiling="both", seed=1, num_images=2)
    plain_view, plain_images = await generate(server, seed=1, num_images=2)
    for index, (wrapped, plain) in enumerate(zip(tiled_images, plain_images, strict=True)):
        print(f"seed {1 + index}: both {ratios(wrapped)}, none {ratios(plain)}")
        assert max(ratios(wrapped)) <= WRAPPED, ratios(wrapped)
        assert min(ratios(plain)) >= SEAM, ratios(plain)
    assert tiled_view["request"]["tiling"] == "both" and plain_view["request"]["tiling"] == "none"
    assert "Tiling: True" in await parameters_of(server, tiled_view)  # A1111's own words
    assert "Tiling" not in await parameters_of(server, plain_view)


async def test_x_wraps_left_to_right_only_and_y_top_to_bottom_only(server: RunningServer) -> None:
    x_view, [x_image] = await generate(server, tiling="x", seed=1)
    y_view, [y_image] = await generate(server, tiling="y", seed=1)
    print(f"x {ratios(x_image)}, y {ratios(y_image)}")
    columns, rows = ratios(x_image)
    assert columns <= WRAPPED and rows >= SEAM
    columns, rows = ratios(y_image)
    assert rows <= WRAPPED and columns >= SEAM
    assert "Tiling: x" in await parameters_of(server, x_view)
    assert "Tiling: y" in await parameters_of(server, y_view)


async def test_a_tile_preview_repeats_each_tile_along_its_axes(server: RunningServer) -> None:
    """`tile_preview`: each image laid 3x3 (both) or 3 times along its one axis, as a file of the result."""
    for tiling, shape in (("both", (3, 3)), ("x", (1, 3))):
        view, images = await generate(server, tiling=tiling, tile_preview=True, seed=2, num_images=2)
        assert len(view["tile_previews"]) == 2
        for url, image in zip(view["tile_previews"], images, strict=True):
            answer = await server.client.get(url)
            assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
            with Image.open(io.BytesIO(answer.content)) as preview:
                assert np.array_equal(np.asarray(preview.convert("RGB")), np.tile(image, (*shape, 1)))
    plain, _ = await generate(server, seed=2)
    assert plain["tile_previews"] == []
    assert (await server.client.get(f"/v1/generations/{plain['id']}/tile-previews/0.png")).status_code == 404
    refused = await server.client.post("/v1/generations", json={**SMALL, "tile_preview": True})
    assert refused.status_code == 422 and refused.json()["error"]["field"] == "tile_preview"


async def test_the_hires_fix_and_img2img_make_tiles_too(server: RunningServer) -> None:
    """Both passes of the hires fix wrap (its latent upscale does not, the repaint mends the edge), and so does
    an img2img repaint of an image without a seam of its own (black edges all round)."""
    hires = {"scale": 2, "steps": 3, "denoise": 0.8}
    view, [wrapped] = await generate(server, tiling="both", seed=1, hires=hires)
    _, [plain] = await generate(server, seed=1, hires=hires)
    print(f"hires: both {ratios(wrapped)}, none {ratios(plain)}")
    assert wrapped.shape == (128, 128, 3)
    assert max(ratios(wrapped)) <= WRAPPED and min(ratios(plain)) >= SEAM
    parameters = await parameters_of(server, view)
    assert "Tiling: True" in parameters and "Hires upscale: 2" in parameters
    headers = {"content-type": "image/png"}
    uploaded = await server.client.post("/v1/uploads", content=png_bytes(square_image()), headers=headers)
    upload = uploaded.json()["id"]
    _, [edited] = await generate(server, tiling="both", seed=1, init_image=upload, strength=0.9)
    _, [edited_plain] = await generate(server, seed=1, init_image=upload, strength=0.9)
    print(f"img2img: both {ratios(edited)}, none {ratios(edited_plain)}")
    assert max(ratios(edited)) <= WRAPPED and min(ratios(edited_plain)) >= SEAM


async def test_an_untiled_image_is_the_same_before_and_after_a_tiled_task(uncached_server: RunningServer) -> None:
    """The engine is shared: a tiled task puts every convolution back as it was, so the next untiled task's
    image is pixel-identical to one made before any tiling."""
    server = uncached_server
    _, [before] = await generate(server, seed=7)
    _, [wrapped] = await generate(server, seed=7, tiling="both")
    _, [x_only] = await generate(server, seed=7, tiling="x")
    _, [after] = await generate(server, seed=7)
    assert np.array_equal(before, after)
    assert not np.array_equal(before, wrapped) and not np.array_equal(wrapped, x_only)


# -- the A1111 door --


async def test_a1111_tiling_true_makes_a_tile_and_png_info_reads_it(server: RunningServer) -> None:
    from tests.test_a1111 import call, client

    api = await call(client, server)
    result = await call(api.txt2img, prompt=SMALL["prompt"], seed=1, width=64, height=64, steps=4, tiling=True)
    pixels = np.asarray(result.image.convert("RGB"))
    print(f"a1111: {ratios(pixels)}")
    assert max(ratios(pixels)) <= WRAPPED
    assert "Tiling: True" in result.info["infotexts"][0]
    request: dict[str, Any] = (await server.client.get("/v1/generations")).json()["items"][0]["request"]
    assert request["tiling"] == "both"
    info = await call(api.png_info, result.image)
    assert info.parameters["Tiling"] == "True"
    plain = await call(api.txt2img, prompt=SMALL["prompt"], seed=1, width=64, height=64, steps=4, tiling=False)
    assert min(ratios(np.asarray(plain.image.convert("RGB")))) >= SEAM
    assert "Tiling" not in plain.info["infotexts"][0]


# -- batching --


@pytest.fixture
async def step_server(tmp_path: Path, tiny_model: Path) -> AsyncIterator[RunningServer]:
    """Step-level batching of up to 4 images, no result cache (a repeated request runs again)."""
    config = server_config(tmp_path / "data", tiny_model, max_batch=4, batch_wait_ms=0, result_cache=False)
    async for running in start_server(config):
        yield running


async def test_a_tiled_and_an_untiled_task_submitted_together_each_get_their_solo_image(
    step_server: RunningServer,
) -> None:
    """Their batch keys differ, so they never share a UNet call: each image is the one it gets alone (within
    the step batches' tolerance), the tiled one a tile and the untiled one not."""
    server = step_server
    together = [
        await submit(server.client, **SMALL, seed=3, tiling="both"),
        await submit(server.client, **SMALL, seed=3),
        await submit(server.client, **SMALL, seed=4, tiling="x"),
    ]
    images = [(await task_images(server, task))[1][0] for task in together]
    alone = [(await generate(server, seed=3, tiling="both"))[1][0]]
    alone.append((await generate(server, seed=3))[1][0])
    alone.append((await generate(server, seed=4, tiling="x"))[1][0])
    for image, solo in zip(images, alone, strict=True):
        assert np.abs(image.astype(int) - solo.astype(int)).max() <= TOLERANCE
    assert max(ratios(images[0])) <= WRAPPED and min(ratios(images[1])) >= SEAM
    assert seam_ratio(images[2], 1) <= WRAPPED


def test_batch_keys_differ_by_tiling_at_request_and_step_level() -> None:
    import msgspec

    from forge.batching import batch_key
    from forge.engine import job_batch_key
    from tests.test_store import SPEC

    keys = {tiling: msgspec.structs.replace(SPEC, tiling=tiling) for tiling in ("none", "x", "y", "both")}
    for step_level in (False, True):
        assert len({batch_key(spec, step_level) for spec in keys.values()}) == 4
    model = tiny_info(Path("tiny"))
    jobs = [Job(model=model, prompt="a", negative_prompt="", width=64, height=64, seeds=[1], steps=2,
                guidance_scale=5.0, scheduler="euler", tiling=tiling) for tiling in keys]  # fmt: skip
    assert len({job_batch_key(job) for job in jobs}) == 4


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> EagerEngine:
    return EagerEngine(tiny_info(tiny_model), "cpu")


def _job(engine: EagerEngine, seed: int, **fields: Any) -> Job:
    base: dict[str, Any] = dict(
        model=engine.model, prompt="a mossy stone wall", negative_prompt="", width=64, height=64, seeds=[seed],
        steps=4, guidance_scale=5.0, scheduler="euler",
    )  # fmt: skip
    return Job(**(base | fields))


def test_the_step_loop_gives_tiled_and_untiled_tasks_unet_calls_of_their_own(engine: EagerEngine) -> None:
    """Given both at once (the scheduler never does), the step loop still calls the UNet apart for each tiling:
    no call has both tasks' rows, and each gets its solo image, a tiled hires fix's second pass too (its
    upscaler decodes and encodes through the tiled VAE)."""
    hires = Hires(upscaler="lanczos", upscale_width=96, upscale_height=96, width=96, height=96, steps=2, denoise=0.6)
    jobs = [
        _job(engine, 1, tiling="both"),
        _job(engine, 2, seeds=[2, 3]),
        _job(engine, 4, tiling="y", steps=3),
        _job(engine, 5, tiling="x", steps=2, hires=hires),
    ]
    rows: list[int] = []
    hook = engine.pipe.unet.conv_in.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    outcomes: dict[int, Any] = {}
    try:
        StepLoop(engine.pipe).run(jobs, lambda job, outcome: outcomes.__setitem__(id(job), outcome), max_images=8)
    finally:
        hook.remove()
    assert set(rows) == {2, 4}  # 2 rows (a guided image) for each tiling, 4 untiled; never more together
    for job in jobs:
        for image, solo in zip(outcomes[id(job)].images, engine.run(job).images, strict=True):
            difference = np.abs(np.asarray(image, dtype=int) - np.asarray(solo, dtype=int)).max()
            assert difference <= TOLERANCE, job.tiling
    assert outcomes[id(jobs[3])].images[0].size == (96, 96)
    assert seam_ratio(np.asarray(outcomes[id(jobs[3])].images[0]), 1) <= WRAPPED
    assert not is_tiled(engine.pipe.components.values())


def test_control_loras_and_references_make_tiles_too(
    tmp_path: Path, tiny_model: Path, tiny_loras: dict[str, Path]
) -> None:
    """Every padded convolution of the job's pipeline wraps: the ControlNet's, a LoRA's own (peft's lora_A is a
    padded Conv2d beside the base layer) and the UNet's under an IP-Adapter."""
    from forge.engine import ControlJob, LoraWeight, Reference, References

    own = EagerEngine(tiny_info(tiny_model), "cpu")  # LoRAs stay loaded in an engine: not the shared one
    square_image().save(tmp_path / "square.png")
    adapter, source = next(iter(own.model.ip_adapters.items()))
    reference = Reference(image=str(tmp_path / "square.png"), strength=0.6, mode="full", start=0, end=1)
    pose = ControlJob(type="openpose", image=None, pose="front", preprocess=False, strength=0.8, start=0, end=1)
    variants: dict[str, dict[str, Any]] = {
        "control": {"controls": [pose]},
        "lora": {"loras": [LoraWeight(name="ink-lora", path=str(tiny_loras["ink-lora"]), weight=0.8)]},
        "references": {"references": References(adapter=adapter, source=source, images=[reference])},
    }
    for name, fields in variants.items():
        wrapped = own.run(_job(own, 1, tiling="both", **fields)).images[0]
        plain = own.run(_job(own, 1, **fields)).images[0]
        print(f"{name}: both {ratios(np.asarray(wrapped))}, none {ratios(np.asarray(plain))}")
        assert max(ratios(np.asarray(wrapped))) <= WRAPPED, name
        assert min(ratios(np.asarray(plain))) >= SEAM, name
        assert not is_tiled([*own.pipe.components.values(), *own._controlnets.values()])


# -- the mechanism --


def test_circular_padding_is_padding_mode_circular_on_both_axes_and_per_axis_otherwise() -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, 3, padding=1)
    reference = torch.nn.Conv2d(3, 5, 3, padding=1, padding_mode="circular")
    reference.load_state_dict(conv.state_dict())
    sample = torch.randn(2, 3, 6, 7)
    plain = conv(sample)
    with tiled([conv], "both"):
        assert torch.equal(conv(sample), reference(sample))
    with tiled([conv], "x"):  # circular left-right, zeros top-bottom
        padded = torch.nn.functional.pad(sample, (1, 1, 0, 0), mode="circular")
        expected = torch.nn.functional.conv2d(padded, conv.weight, conv.bias, padding=(1, 0))
        assert torch.allclose(conv(sample), expected)
    with tiled([conv], "y"):
        padded = torch.nn.functional.pad(sample, (0, 0, 1, 1), mode="circular")
        expected = torch.nn.functional.conv2d(padded, conv.weight, conv.bias, padding=(0, 1))
        assert torch.allclose(conv(sample), expected)
        # inside, away from the wrapped edges, nothing changes
        assert torch.equal(conv(sample)[:, :, 1:-1, 1:-1], plain[:, :, 1:-1, 1:-1])
    assert torch.equal(conv(sample), plain) and "_conv_forward" not in vars(conv)


def test_the_layers_are_restored_exactly_even_when_the_job_fails(engine: EagerEngine) -> None:
    modules = [engine.pipe.unet, engine.pipe.vae]
    convs = padded_convs(modules)
    assert convs and all(isinstance(conv, torch.nn.Conv2d) for conv in convs)
    assert any(conv in padded_convs([engine.pipe.vae.encoder]) for conv in convs)  # the encoder too
    before = {id(conv): dict(vars(conv)) for conv in convs}
    with pytest.raises(RuntimeError, match="boom"), tiled(modules, "both"):
        assert is_tiled(modules)
        raise RuntimeError("boom")
    with tiled(modules, "none"):
        assert not is_tiled(modules)
    assert not is_tiled(modules)
    assert all(dict(vars(conv)) == before[id(conv)] for conv in convs)


def test_the_eager_engine_leaves_no_layer_tiled(engine: EagerEngine) -> None:
    base = _job(engine, 5)
    before = engine.run(base).images[0]
    engine.run(dataclasses.replace(base, tiling="both", seeds=[5, 6]))
    assert not is_tiled(engine.pipe.components.values())
    assert np.array_equal(np.asarray(engine.run(base).images[0]), np.asarray(before))


# -- MCP and the web UI --


@pytest.mark.adapters
async def test_tiling_goes_through_mcp_and_the_web_ui(server: RunningServer) -> None:
    from tests.test_mcp import mcp_session
    from tests.test_ui import DEFAULTS

    async with mcp_session(server, "streamable-http") as session:
        tools = {tool.name: tool for tool in (await session.list_tools()).tools}
        schema = tools["generate_character"].input_schema["properties"]["tiling"]
        assert schema["enum"] == ["none", "x", "y", "both"] and schema["default"] == "none"
        result = await session.call_tool(
            "generate_character", {"prompt": SMALL["prompt"], "size": "64x64", "seed": 1, "tiling": "x"}
        )
        assert not result.is_error, result.content
        refused = await session.call_tool("generate_character", {"prompt": SMALL["prompt"], "tiling": "z"})
        assert refused.is_error
    request = (await server.client.get("/v1/generations")).json()["items"][0]["request"]
    assert request["tiling"] == "x"
    settings = await anyio.to_thread.run_sync(_through_the_ui, server)
    assert settings[list(DEFAULTS).index("tiling")] == "both"


def _through_the_ui(server: RunningServer) -> list[Any]:
    """Generate with the Tiling radio on `both`, then the task's settings as "Use these settings again" gives them."""
    from gradio_client import Client

    from tests.test_ui import DEFAULTS

    client = Client(f"http://127.0.0.1:{server.handle.ui_port}/", verbose=False)
    try:
        client.predict(*{**DEFAULTS, "random_seed": False, "seed": 2, "tiling": "both"}.values(), api_name="/generate")
        newest = httpx.get(f"{server.base_url}/v1/generations").json()["items"][0]
        assert newest["request"]["tiling"] == "both"
        settings: list[Any] = client.predict(newest["id"], api_name="/reuse")
        return settings
    finally:
        client.close()


def test_a_compiled_engine_runs_tiled_jobs_uncompiled_and_compiles_nothing_for_them(
    tmp_path: Path, tiny_model: Path, engine: EagerEngine, compiled_cache: Path
) -> None:
    """The compiled backend falls back to eager modules for a tiled job (request- and step-level): eager's tiled
    image, no compile or recompile for it, and the next untiled job runs the compiled code it had."""
    import threading

    from engines.compiled import CompiledEngine, CompileOptions

    base = _job(engine, 5)
    wrapped = dataclasses.replace(base, tiling="both")
    got: dict[str, Any] = {}

    shutil.copytree(compiled_cache, tmp_path / "cache")  # a restart: the block graphs are loaded, not compiled

    def serve() -> None:  # on a thread that then ends, as an engine's does
        compiled = CompiledEngine(engine.model, "cpu", CompileOptions(cache_dir=tmp_path / "cache", max_rows=4))
        got["loaded"] = compiled.regions.loaded if compiled.regions else 0
        compiled.warm()
        counted = compiled.compile_counts
        got["warm"] = (counted.compiles, counted.recompiles)
        got["tiled"] = compiled.run(wrapped).images[0]
        stepped: list[Any] = []
        compiled.run_steps([wrapped], lambda job, outcome: stepped.append(outcome), lambda free: [], 4)
        got["stepped"] = stepped[0].images[0]
        got["plain"] = compiled.run(base).images[0]
        got["after"] = (counted.compiles, counted.recompiles)
        got["left_tiled"] = is_tiled(compiled.pipe.components.values())

    worker = threading.Thread(target=serve)
    worker.start()
    worker.join()
    assert got["loaded"] > 0 and got["warm"] == got["after"]
    assert not got["left_tiled"]
    for name, job in (("tiled", wrapped), ("stepped", wrapped), ("plain", base)):
        difference = np.abs(np.asarray(got[name], dtype=int) - np.asarray(engine.run(job).images[0], dtype=int))
        assert difference.max() <= TOLERANCE, name
    assert max(ratios(np.asarray(got["tiled"]))) <= WRAPPED
