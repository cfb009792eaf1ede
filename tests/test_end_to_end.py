"""Submit over REST, follow progress over WebSocket, download the PNG: a real hypercorn server."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from httpx_ws import aconnect_ws
from PIL import Image

from actors.encoding import read_parameters
from forge.infotext import parse_infotext
from tests.conftest import RunningServer
from tests.helpers import submit, wait_for_state

pytestmark = pytest.mark.anyio


async def _image(server: RunningServer, url: str) -> Image.Image:
    response = await server.client.get(url)
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(response.content))
    image.load()
    return image


async def test_generation_progress_over_websocket_then_png_with_parameters(server: RunningServer) -> None:
    task = await submit(
        server.client,
        prompt="a fox ranger, green cloak",
        negative_prompt="blurry, text",
        seed=1234,
        width=128,
        height=96,
        steps=6,
    )
    assert task["state"] == "queued"
    events = []
    async with aconnect_ws(f"{server.ws_url}{task['links']['events']}", server.client) as ws:
        while True:
            event = json.loads(await ws.receive_text())
            events.append(event)
            if event["type"] in {"succeeded", "failed", "cancelled"}:
                break
    kinds = [event["type"] for event in events]
    assert kinds[-1] == "succeeded", events
    progress = [event for event in events if event["type"] == "progress"]
    assert [p["step"] for p in progress][-1] == 6 and all(p["total"] == 6 for p in progress)
    previews = [p["preview_jpeg_b64"] for p in progress if p["preview_jpeg_b64"]]
    assert previews, "latent previews were sent"
    assert Image.open(io.BytesIO(base64.b64decode(previews[0]))).format == "JPEG"

    view = await wait_for_state(server.client, task["id"])
    assert view["state"] == "succeeded" and view["seeds"] == [1234]
    image = await _image(server, view["images"][0]["url"])
    assert image.size == (128, 96)
    parameters = read_parameters(image)
    assert parameters is not None
    prompt, negative, params = parse_infotext(parameters)
    assert (prompt, negative) == ("a fox ranger, green cloak", "blurry, text")
    assert params["Seed"] == "1234" and params["Steps"] == "6" and params["Size"] == "128x96"
    assert params["Model"] == server.handle.model.name


async def test_same_seed_same_image_and_each_image_reproducible_alone(uncached_server: RunningServer) -> None:
    server = uncached_server
    first = await submit(server.client, seed=77, num_images=2, steps=3)
    again = await submit(server.client, seed=77, num_images=2, steps=3)
    second_alone = await submit(server.client, seed=78, num_images=1, steps=3)
    other = await submit(server.client, seed=79, num_images=1, steps=3)
    views = [await wait_for_state(server.client, t["id"]) for t in (first, again, second_alone, other)]
    assert [v["state"] for v in views] == ["succeeded"] * 4
    pixels = [[np.asarray(await _image(server, img["url"])) for img in v["images"]] for v in views]
    assert views[0]["seeds"] == [77, 78]
    np.testing.assert_array_equal(pixels[0][0], pixels[1][0])
    np.testing.assert_array_equal(pixels[0][1], pixels[1][1])
    # Image 1 of seed 77 is seed 78's image: same noise, batched or not (float noise of batching aside).
    assert np.abs(pixels[0][1].astype(int) - pixels[2][0].astype(int)).max() <= 2
    assert np.abs(pixels[0][0].astype(int) - pixels[3][0].astype(int)).max() > 10


async def test_late_websocket_gets_current_state_first(server: RunningServer) -> None:
    task = await submit(server.client, steps=2)
    await wait_for_state(server.client, task["id"])
    async with aconnect_ws(f"{server.ws_url}{task['links']['events']}", server.client) as ws:
        event = json.loads(await ws.receive_text())
    assert event["type"] == "succeeded"
    assert event["images"] == [f"/v1/generations/{task['id']}/images/0"]


async def test_websocket_for_unknown_task_reports_not_found(server: RunningServer) -> None:
    async with aconnect_ws(f"{server.ws_url}/v1/generations/nope/events", server.client) as ws:
        body = json.loads(await ws.receive_text())
    assert body["error"]["code"] == "not_found"


@pytest.mark.parametrize("output_format", ["webp", "jpeg"])
async def test_other_formats_carry_parameters(server: RunningServer, output_format: str) -> None:
    task = await submit(server.client, seed=5, steps=2, output_format=output_format)
    view = await wait_for_state(server.client, task["id"])
    response = await server.client.get(view["images"][0]["url"])
    assert response.headers["content-type"] == f"image/{output_format}"
    image = Image.open(io.BytesIO(response.content))
    assert image.format == output_format.upper()
    parameters = read_parameters(image)
    assert parameters is not None and "Seed: 5" in parameters


async def test_websocket_of_a_queued_task_starts_with_its_position_and_cleans_up(server: RunningServer) -> None:
    blocker = await submit(server.client, width=512, height=512, steps=40)
    waiting = await submit(server.client, steps=1)
    await wait_for_state(server.client, blocker["id"], {"running"})
    async with aconnect_ws(f"{server.ws_url}{waiting['links']['events']}", server.client) as ws:
        first = json.loads(await ws.receive_text())
        assert first == {"type": "queued", "task_id": waiting["id"], "position": 0}
        assert server.handle.hub.statistics()["subscribers"] == 1
    await server.client.post(blocker["links"]["cancel"])
    await wait_for_state(server.client, waiting["id"])
    assert server.handle.hub.statistics()["subscribers"] == 0, "a closed WebSocket leaves no subscription"


async def test_no_progress_lingers_after_a_task_ends(server: RunningServer) -> None:
    tasks = [await submit(server.client, steps=4) for _ in range(3)]
    running = await submit(server.client, width=512, height=512, steps=150)
    await wait_for_state(server.client, running["id"], {"running"})
    await server.client.post(running["links"]["cancel"])
    views = [await wait_for_state(server.client, t["id"]) for t in [*tasks, running]]
    assert all(view["progress"] is None for view in views)
    assert server.handle.hub.statistics()["tasks_with_progress"] == 0
