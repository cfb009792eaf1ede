"""ControlNet control: canny edges, depth (given or estimated), openpose (image or template), several at
once, uploads and inline images, and the errors for what cannot work."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engines.control import DepthEstimator, canny_edges, prepare_control
from engines.models import resolve_model
from engines.poses import render_pose
from forge.engine import ControlJob
from tests.conftest import RunningServer
from tests.helpers import generate_pixels, gradient_image, png_bytes, square_image

pytestmark = pytest.mark.anyio


def test_canny_edges_trace_the_outline_of_a_shape() -> None:
    edges = np.asarray(canny_edges(square_image()))[..., 0] > 0
    assert edges.shape == (64, 64)
    assert edges[16:48, 15:17].any() and edges[15:17, 16:48].any()  # the left and top sides
    assert not edges[22:42, 22:42].any() and not edges[:10].any()  # nothing inside or far outside


def test_tiny_depth_model_gives_a_normalised_map_at_the_image_size(tiny_model: Path) -> None:
    model = resolve_model(str(tiny_model), tiny_model.parent, 1)
    assert model.depth_model is not None
    depth = np.asarray(DepthEstimator(model.depth_model, "cpu")(square_image(80)))
    assert depth.shape == (80, 80, 3) and (depth[..., 0] == depth[..., 2]).all()
    assert depth.min() == 0 and depth.max() == 255


def test_control_images_are_prepared_at_the_output_size(tmp_path: Path) -> None:
    path = tmp_path / "square.png"
    square_image(32).save(path)
    edges = prepare_control(ControlJob(type="canny", image=str(path), pose=None, preprocess=True, strength=1,
                                       start=0, end=1), 96, 64, None)  # fmt: skip
    pose = prepare_control(ControlJob(type="openpose", image=None, pose="run", preprocess=False, strength=1,
                                      start=0, end=1), 96, 64, None)  # fmt: skip
    assert edges.size == pose.size == (96, 64)
    assert np.array_equal(np.asarray(pose), np.asarray(render_pose("run", 96, 64)))


async def _upload(server: RunningServer, image: Image.Image) -> str:
    response = await server.client.post("/v1/uploads", content=png_bytes(image), headers={"content-type": "image/png"})
    assert response.status_code == 201, response.text
    assert response.json()["width"] == image.width
    upload_id: str = response.json()["id"]
    return upload_id


async def test_each_control_type_changes_the_image_and_follows_its_input(server: RunningServer) -> None:
    client = server.client
    _, plain = await generate_pixels(client, seed=3)
    square = await _upload(server, square_image())
    square_moved = await _upload(server, square_image(box=(4, 30, 30, 60)))
    ramp, ramp_turned = await _upload(server, gradient_image()), await _upload(server, gradient_image(horizontal=False))
    cases = {
        "canny": (square, square_moved),
        "depth": (ramp, ramp_turned),
    }
    for kind, (first, second) in cases.items():
        _, a = await generate_pixels(client, seed=3, control={"type": kind, "image": first, "strength": 1.0})
        _, a_again = await generate_pixels(client, seed=3, control={"type": kind, "image": first, "strength": 1.0})
        _, b = await generate_pixels(client, seed=3, control={"type": kind, "image": second, "strength": 1.0})
        _, off = await generate_pixels(client, seed=3, control={"type": kind, "image": first, "strength": 0.0})
        assert not np.array_equal(a, plain), kind
        assert np.array_equal(a, a_again), kind
        assert not np.array_equal(a, b), kind  # a different control image, a different picture
        assert np.array_equal(off, plain), kind  # strength 0: the ControlNet adds nothing
    _, front = await generate_pixels(client, seed=3, control={"type": "openpose", "pose": "front"})
    _, jump = await generate_pixels(client, seed=3, control={"type": "openpose", "pose": "jump"})
    _, drawn = await generate_pixels(client, seed=3, control={"type": "openpose", "image": await _upload(
        server, render_pose("front", 64, 64))})  # fmt: skip
    assert not np.array_equal(front, plain) and not np.array_equal(front, jump)
    assert np.array_equal(front, drawn)  # a template is exactly the pose image it draws


async def _default_model_bytes(server: RunningServer) -> int:
    default = (await server.client.get("/v1/models")).json()["items"][0]
    size: int = default["devices"][0]["memory_bytes"]
    return size


async def test_inline_base64_images_and_several_controlnets_at_once(server: RunningServer) -> None:
    before = await _default_model_bytes(server)
    inline = base64.b64encode(png_bytes(gradient_image())).decode()
    control = [
        {"type": "openpose", "pose": "attack", "strength": 0.9, "end": 0.8},
        {"type": "depth", "image": f"data:image/png;base64,{inline}", "strength": 0.5},
    ]
    view, both = await generate_pixels(server.client, seed=8, control=control)
    _, pose_only = await generate_pixels(server.client, seed=8, control=control[:1])
    assert not np.array_equal(both, pose_only)
    stored = view["request"]["control"]
    assert [c["type"] for c in stored] == ["openpose", "depth"]
    assert stored[1]["image"].startswith("up_")  # the task keeps an upload id, not the image
    _, by_id = await generate_pixels(
        server.client, seed=8, control=[control[0], {**control[1], "image": stored[1]["image"]}]
    )
    assert np.array_equal(both, by_id)
    assert await _default_model_bytes(server) > before  # loaded ControlNets count against the memory budget


async def test_depth_estimated_from_an_ordinary_image(server: RunningServer) -> None:
    photo = await _upload(server, square_image())
    view, estimated = await generate_pixels(server.client, seed=2, control={"type": "depth", "image": photo,
                                                                            "preprocess": True})  # fmt: skip
    _, given = await generate_pixels(server.client, seed=2, control={"type": "depth", "image": photo})
    assert view["request"]["control"][0]["preprocess"] is True
    assert not np.array_equal(estimated, given)


async def test_the_character_sheet_style_brings_its_turnaround_pose(server: RunningServer) -> None:
    view, _ = await generate_pixels(server.client, style="character-sheet")
    assert view["request"]["control"] == [
        {"type": "openpose", "image": None, "pose": "turnaround", "preprocess": False, "strength": 0.9, "start": 0.0,
         "end": 1.0}
    ]  # fmt: skip
    assert view["request"]["width"] > view["request"]["height"]


CONTROL_ERRORS: list[tuple[object, str, str]] = [
    ({"type": "openpose", "pose": "moonwalk"}, "control.pose", "unknown_pose"),
    ({"type": "openpose"}, "control.image", "required"),
    ({"type": "canny"}, "control.image", "required"),
    ({"type": "canny", "pose": "front"}, "control.pose", "invalid"),
    ({"type": "openpose", "pose": "front", "preprocess": True}, "control.preprocess", "invalid"),
    ({"type": "canny", "image": "up_" + "0" * 32}, "control.image", "unknown_upload"),
    ({"type": "canny", "image": "not base64 at all!"}, "control.image", "image"),
    ({"type": "canny", "image": base64.b64encode(b"plain text").decode()}, "control.image", "image"),
    ({"type": "openpose", "pose": "front", "start": 0.6, "end": 0.4}, "control.start", "range"),
    ({"type": "scribble", "pose": "front"}, "control.type", "enum"),
    ({"type": "canny", "image": "x", "strength": 3}, "control.strength", "maximum"),
    ([{"type": "openpose", "pose": "front"}] * 4, "control", "max_length"),
    ([{"type": "openpose", "pose": "front"}, {"type": "depth"}], "control[1].image", "required"),
]


async def test_control_errors(server: RunningServer) -> None:
    for control, field, rule in CONTROL_ERRORS:
        response = await server.client.post("/v1/generations", json={"prompt": "x", "control": control})
        assert response.status_code == 422, (control, response.text)
        error = response.json()["error"]
        assert (error["field"], error["rule"]) == (field, rule), (control, error)


async def test_upload_errors(server: RunningServer) -> None:
    not_image = await server.client.post("/v1/uploads", content=b"hello", headers={"content-type": "image/png"})
    assert not_image.status_code == 422 and not_image.json()["error"]["rule"] == "image"
    huge = Image.new("RGB", (5000, 8), "white")
    too_wide = await server.client.post("/v1/uploads", content=png_bytes(huge))
    assert too_wide.status_code == 422 and too_wide.json()["error"]["rule"] == "range"
