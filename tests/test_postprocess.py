"""Post-processing through the server: every step on a real task, progress events, metadata, sprite
sheets (per task and across tasks), style defaults, and the errors for missing models and bad options."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
from httpx_ws import aconnect_ws
from PIL import Image

from actors.encoding import read_parameters
from engines.palettes import palette_rgb
from forge.infotext import parse_infotext
from tests.conftest import RunningServer, install_postprocess_models, server_config, start_server
from tests.helpers import submit, wait_for_state

pytestmark = pytest.mark.anyio

FULL = {
    "upscale": 2,
    "remove_background": True,
    "background_model": "isnet-anime",
    "trim": True,
    "trim_padding": 4,
    "pixel_art": {"factor": 4, "palette": "pico-8", "outline": True},
    "resize": {"width": 96, "height": 96, "mode": "pad"},
    "sprite_sheet": {"columns": 2},
}


@pytest.fixture
async def pp_server(tmp_path: Path, tiny_model: Path, postprocess_models: Path) -> AsyncIterator[RunningServer]:
    data = tmp_path / "data"
    install_postprocess_models(data, postprocess_models)
    styles = tmp_path / "styles"
    styles.mkdir()
    (styles / "retro-sprite.toml").write_text(
        'description = "Retro sprite"\nprompt = "{prompt}, sprite"\n'
        '[postprocess]\nremove_background = true\n[postprocess.pixel_art]\nfactor = 8\npalette = "game-boy"\n'
    )
    async for running in start_server(server_config(data, tiny_model, styles_dir=str(styles))):
        yield running


async def _image(server: RunningServer, url: str) -> Image.Image:
    response = await server.client.get(url)
    assert response.status_code == 200
    return Image.open(io.BytesIO(response.content))


async def test_every_step_on_a_task_with_progress_metadata_and_sheet(pp_server: RunningServer) -> None:
    task = await submit(pp_server.client, num_images=2, width=128, height=128, seed=9, postprocess=FULL)
    events: list[dict[str, Any]] = []
    async with aconnect_ws(f"{pp_server.ws_url}/v1/generations/{task['id']}/events") as ws:
        while not events or events[-1]["type"] not in {"succeeded", "failed", "cancelled"}:
            events.append(json.loads(await ws.receive_text()))
    assert events[-1]["type"] == "succeeded", events[-1]
    stages = [(e["image"], e["stage"], e["step"], e["total"]) for e in events if e.get("stage")]
    steps = ["upscale", "remove_background", "trim", "pixel_art", "resize"]
    assert stages == [(i, s, n, 5) for i in (0, 1) for n, s in enumerate(steps, start=1)]

    view = (await pp_server.client.get(f"/v1/generations/{task['id']}")).json()
    spec = view["request"]["postprocess"]
    assert spec["upscaler"] == "RealESRGAN_x4plus" and spec["background_model"] == "isnet-anime"
    pico = set(palette_rgb("pico-8"))
    images = [await _image(pp_server, link["url"]) for link in view["images"]]
    for image in images:
        assert image.mode == "RGBA" and image.size == (96, 96)
        pixels = np.asarray(image)
        visible = pixels[..., 3] > 0
        assert visible.any() and {tuple(c) for c in pixels[visible][:, :3]} <= pico
        _, _, params = parse_infotext(read_parameters(image) or "")
        assert params["Postprocess"].startswith("upscale x2 (RealESRGAN_x4plus); remove_background (isnet-anime)")

    metadata = json.loads(
        (Path(pp_server.handle.config.data_dir) / "outputs" / task["id"] / "metadata.json").read_text()
    )
    assert metadata["images"][0]["postprocess"][-1] == "resize 96x96 pad"

    assert view["sprite_sheet"]["atlas"].endswith("/sprite-sheet.json")
    atlas = (await pp_server.client.get(view["sprite_sheet"]["atlas"])).json()
    sheet = np.asarray(await _image(pp_server, view["sprite_sheet"]["image"]))
    assert atlas["meta"]["image"] == "sprite-sheet.png"
    for index, image in enumerate(images):
        frame = atlas["frames"][f"{task['id']}/{index}"]["frame"]
        crop = sheet[frame["y"] : frame["y"] + frame["h"], frame["x"] : frame["x"] + frame["w"]]
        assert np.array_equal(crop, np.asarray(image))


async def test_a_style_brings_its_post_processing(pp_server: RunningServer) -> None:
    view = await wait_for_state(pp_server.client, (await submit(pp_server.client, style="retro-sprite"))["id"])
    assert view["state"] == "succeeded", view["error"]
    assert view["request"]["postprocess"]["pixel_art"]["palette"] == "game-boy"
    styles = {s["name"]: s for s in (await pp_server.client.get("/v1/styles")).json()["items"]}
    assert styles["retro-sprite"]["postprocess"]["remove_background"] is True
    assert styles["retro-sprite"]["available"] is True
    image = np.asarray(await _image(pp_server, view["images"][0]["url"]))
    visible = image[..., 3] > 0
    assert {tuple(c) for c in image[visible][:, :3]} <= set(palette_rgb("game-boy"))


async def test_jpeg_output_is_flattened_onto_the_matte(pp_server: RunningServer) -> None:
    options = {"remove_background": True, "matte": "#00ff00", "quality": 80}
    view = await wait_for_state(
        pp_server.client, (await submit(pp_server.client, output_format="jpeg", postprocess=options))["id"]
    )
    assert view["state"] == "succeeded", view["error"]
    image = await _image(pp_server, view["images"][0]["url"])
    assert image.mode == "RGB" and read_parameters(image)


async def test_sheets_from_several_tasks(pp_server: RunningServer) -> None:
    client = pp_server.client
    first = await wait_for_state(client, (await submit(client, num_images=2))["id"])
    second = await wait_for_state(client, (await submit(client))["id"])
    created = await client.post("/v1/sprite-sheets", json={"tasks": [first["id"], second["id"]], "columns": 3})
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["frames"] == [f"{first['id']}/0", f"{first['id']}/1", f"{second['id']}/0"]
    atlas = (await client.get(body["atlas"])).json()
    assert set(atlas["frames"]) == set(body["frames"]) and atlas["meta"]["image"] == f"{body['id']}.png"
    assert (await client.get(body["image"])).headers["content-type"] == "image/png"
    missing = await client.post("/v1/sprite-sheets", json={"tasks": ["0" * 32]})
    assert missing.status_code == 404
    queued = await submit(client, steps=40, width=256, height=256)
    busy = await client.post("/v1/sprite-sheets", json={"tasks": [queued["id"]]})
    assert busy.status_code == 409 and busy.json()["error"]["field"] == "tasks[0]"
    await client.post(f"/v1/generations/{queued['id']}/cancel")


POSTPROCESS_ERRORS: list[tuple[dict[str, Any], str, str]] = [
    ({"upscale": 4, "upscaler": "nope"}, "postprocess.upscaler", "model_missing"),
    ({"remove_background": True, "background_model": "birefnet"}, "postprocess.background_model", "model_missing"),
    ({"upscale": 3}, "postprocess.upscale", "enum"),
    ({"trim": True}, "postprocess.trim", "needs_transparency"),
    ({"pixel_art": {"outline": True}}, "postprocess.pixel_art.outline", "needs_transparency"),
    ({"pixel_art": {"colors": 8, "palette": "nes"}}, "postprocess.pixel_art.palette", "exclusive"),
    ({"pixel_art": {"palette": "c64"}}, "postprocess.pixel_art.palette", "unknown_palette"),
    ({"pixel_art": {"factor": 0}}, "postprocess.pixel_art.factor", "minimum"),
    ({"resize": {"width": 64, "height": 64, "mode": "squash"}}, "postprocess.resize.mode", "enum"),
    ({"matte": "white"}, "postprocess.matte", "pattern"),
    ({"sprite_sheet": {"columns": 0}}, "postprocess.sprite_sheet.columns", "minimum"),
    ({"sharpen": True}, "postprocess.sharpen", "unknown_field"),
]


async def test_postprocess_errors(pp_server: RunningServer) -> None:
    for options, field, rule in POSTPROCESS_ERRORS:
        response = await pp_server.client.post("/v1/generations", json={"prompt": "x", "postprocess": options})
        assert response.status_code == 422, (options, response.text)
        error = response.json()["error"]
        assert (error["field"], error["rule"]) == (field, rule), (options, error)
    body = {"prompt": "x", "postprocess": POSTPROCESS_ERRORS[0][0]}
    missing = (await pp_server.client.post("/v1/generations", json=body)).json()
    assert "nope.pth" in missing["error"]["message"] and "upscalers" in missing["error"]["message"]


async def test_a_model_file_gone_after_acceptance_fails_the_task_by_name(
    tmp_path: Path, tiny_model: Path, postprocess_models: Path
) -> None:
    data = tmp_path / "data"
    install_postprocess_models(data, postprocess_models)
    async for running in start_server(server_config(data, tiny_model, max_output_pixels=128 * 128 * 4)):
        listing = (await running.client.get("/v1/postprocess")).json()
        assert listing["upscalers"] == ["RealESRGAN_x2plus", "RealESRGAN_x4plus"]
        assert "isnet-anime" in listing["background_models"] and len(listing["palettes"]["pico-8"]) == 16
        too_big = await running.client.post(
            "/v1/generations", json={"prompt": "x", "width": 128, "height": 128, "postprocess": {"upscale": 4}}
        )
        assert too_big.status_code == 422 and too_big.json()["error"]["rule"] == "max_pixels"
        task = await submit(running.client, steps=30, postprocess={"upscale": 2})
        (data / "models" / "upscalers" / "RealESRGAN_x4plus.pth").unlink()
        view = await wait_for_state(running.client, task["id"])
        assert view["state"] == "failed" and view["error"]["code"] == "postprocess_model_missing"
        assert "RealESRGAN_x4plus" in view["error"]["message"]


async def test_cancel_during_upscaling_stops_at_the_next_tile(
    tmp_path: Path, tiny_model: Path, postprocess_models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from engines.upscale import Upscaler

    tiles: list[int] = []
    second_tile, go_on = threading.Event(), threading.Event()
    upscale = Upscaler.__call__

    def counted(self: Upscaler, image: Image.Image, factor: int, before_tile: Any = None) -> Image.Image:
        def gate() -> None:
            tiles.append(1)
            if len(tiles) == 2:  # hold the second tile until the test has cancelled
                second_tile.set()
                go_on.wait(30)
            before_tile()

        return upscale(self, image, factor, gate)

    monkeypatch.setattr(Upscaler, "__call__", counted)
    data = tmp_path / "data"
    install_postprocess_models(data, postprocess_models)
    async for server in start_server(server_config(data, tiny_model, upscale_tile=32)):
        task = await submit(server.client, num_images=2, width=128, height=128, postprocess={"upscale": 2})
        await anyio.to_thread.run_sync(second_tile.wait, 60)  # 16 tiles an image, 32 in all
        cancelled = await server.client.post(task["links"]["cancel"])
        assert cancelled.json()["state"] == "cancelled"
        go_on.set()
        after = await wait_for_state(server.client, (await submit(server.client, steps=2))["id"])
        assert after["state"] == "succeeded"  # the post-processor is free again...
        assert len(tiles) == 2  # ...having stopped before the tile it was held at, not 30 tiles later
        assert not (data / "outputs" / task["id"]).exists()


def _build_endless_segmenter(target_file: Path) -> None:
    """A segmentation model that runs for minutes: a Loop of 300,000 matrix products in one onnxruntime call."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    body = helper.make_graph(
        [helper.make_node("MatMul", ["x_in", "eye"], ["x_out"]), helper.make_node("Identity", ["go"], ["go_on"])],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("go", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x_in", TensorProto.FLOAT, None),
        ],
        [
            helper.make_tensor_value_info("go_on", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x_out", TensorProto.FLOAT, None),
        ],
    )
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["input"], ["brightness"], axes=[1], keepdims=1),
            helper.make_node("Loop", ["trips", "", "brightness"], ["mask"], body=body),
        ],
        "endless-mask",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, "height", "width"])],
        [helper.make_tensor_value_info("mask", TensorProto.FLOAT, [1, 1, "height", "width"])],
        [
            numpy_helper.from_array(np.eye(320, dtype=np.float32), "eye"),
            numpy_helper.from_array(np.array(300_000, dtype=np.int64), "trips"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, target_file)


async def test_cancel_during_background_removal_interrupts_the_model(
    tmp_path: Path, tiny_model: Path, postprocess_models: Path
) -> None:
    data = tmp_path / "data"
    install_postprocess_models(data, postprocess_models)
    _build_endless_segmenter(data / "models" / "rembg" / "endless.onnx")
    async for server in start_server(server_config(data, tiny_model)):
        task = await submit(
            server.client, steps=2, postprocess={"remove_background": True, "background_model": "endless"}
        )
        async with aconnect_ws(f"{server.ws_url}/v1/generations/{task['id']}/events") as ws:
            while json.loads(await ws.receive_text()).get("stage") != "remove_background":
                pass
        await anyio.sleep(1)  # well inside the model's run, which takes minutes
        cancelled = await server.client.post(task["links"]["cancel"])
        assert cancelled.json()["state"] == "cancelled"
        after = await wait_for_state(server.client, (await submit(server.client, steps=2))["id"])
        assert after["state"] == "succeeded"  # the post-processor was freed, not held for minutes
        assert not (data / "outputs" / task["id"]).exists()
