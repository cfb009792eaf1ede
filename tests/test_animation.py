"""Animation cycles: a character's walk in four directions as one task, with its sprite sheet, an animation
per direction and the Aseprite and Godot atlases; the poses from one 3D skeleton; pixel art with one
palette for every frame; and bad input named by its field."""

from __future__ import annotations

import io
import json
import re
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageSequence

from engines.animation_poses import ACTIONS, DIRECTIONS, frame_name, frame_skeleton
from tests.conftest import RunningServer
from tests.helpers import wait_for_state

pytestmark = pytest.mark.anyio

FRAME = {"width": 64, "height": 64, "steps": 2}


def test_every_direction_of_a_frame_is_the_same_body_turned() -> None:
    """The rig is turned, not redrawn: a joint's height is the same in all eight directions, E mirrors W
    with the same limbs, and a back view shows no nose or eyes while a front view shows both."""
    for action in ACTIONS:
        for index in range(6):
            views = {d: frame_skeleton(action, 6, d, index) for d in DIRECTIONS[8]}
            body = range(1, 14)  # neck to ankles; the face's points come and go with the turn
            for skeleton in views.values():
                assert [skeleton[j][1] for j in body] == [views["s"][j][1] for j in body]  # type: ignore[index]
            for joint in body:
                assert views["e"][joint][0] == pytest.approx(-views["w"][joint][0])  # type: ignore[index]
            assert views["n"][0] is None and views["n"][14] is None and views["n"][15] is None
            assert all(views["s"][j] is not None for j in (0, 14, 15))
    walk = [frame_skeleton("walk", 6, "w", index) for index in range(6)]
    assert len({tuple(skeleton) for skeleton in walk}) == 6  # every frame moves


async def _animation(client: Any, character: str, **fields: Any) -> dict[str, Any]:
    response = await client.post(f"/v1/characters/{character}/animations", json={**FRAME, "seed": 11, **fields})
    assert response.status_code == 202, response.text
    view = await wait_for_state(client, response.json()["id"], timeout_s=180)
    assert view["state"] == "succeeded", view["error"]
    return view


async def _files(client: Any, view: dict[str, Any]) -> dict[str, bytes]:
    links = view["animation"]
    urls = {**{f"gif-{d}": url for d, url in links["directions"].items()}, "aseprite": links["aseprite"]}
    urls |= {"godot": links["godot"], "sheet": view["sprite_sheet"]["image"]}
    found = {}
    for name, url in urls.items():
        response = await client.get(url)
        assert response.status_code == 200, (url, response.text)
        found[name] = response.content
    return found


async def test_a_four_direction_walk_is_one_task_with_its_sheet_animations_and_atlases(
    uncached_server: RunningServer,
) -> None:
    client = uncached_server.client
    created = await client.post("/v1/characters", json={"name": "rook", "description": "a squire in red"})
    character = created.json()["id"]
    view = await _animation(client, character, action="walk", directions=4, frames=6)
    assert len(view["images"]) == 24 and set(view["seeds"]) == {11}
    files = await _files(client, view)

    # A row per direction, a column per frame, the rectangles of both atlases on that grid.
    sheet = Image.open(io.BytesIO(files["sheet"]))
    aseprite = json.loads(files["aseprite"])
    rects = [frame["frame"] for frame in aseprite["frames"]]
    assert len(rects) == 24 and aseprite["meta"]["size"] == {"w": sheet.width, "h": sheet.height}
    assert {(r["w"], r["h"]) for r in rects} == {(64, 64)}
    for index, rect in enumerate(rects):
        row, column = divmod(index, 6)
        assert rect["x"] == rects[column]["x"] and rect["y"] == rects[row * 6]["y"]
        assert rect["x"] + rect["w"] <= sheet.width and rect["y"] + rect["h"] <= sheet.height
    assert [(t["name"], t["from"], t["to"]) for t in aseprite["meta"]["frameTags"]] == [
        ("walk_s", 0, 5), ("walk_w", 6, 11), ("walk_n", 12, 17), ("walk_e", 18, 23)
    ]  # fmt: skip
    godot = files["godot"].decode()
    regions = [tuple(map(int, m)) for m in re.findall(r"region = Rect2\((\d+), (\d+), (\d+), (\d+)\)", godot)]
    assert regions == [(r["x"], r["y"], r["w"], r["h"]) for r in rects]
    assert re.findall(r'"name": &"(\w+)"', godot) == ["walk_s", "walk_w", "walk_n", "walk_e"]
    assert godot.startswith('[gd_resource type="SpriteFrames"') and 'path="sprite-sheet.png"' in godot

    # Each direction's GIF plays its row's six frames; frame k of direction d is the sheet's cell.
    sheet_rgb = sheet.convert("RGB")
    for row, direction in enumerate(DIRECTIONS[4]):
        gif = Image.open(io.BytesIO(files[f"gif-{direction}"]))
        frames = [frame.convert("RGB") for frame in ImageSequence.Iterator(gif)]
        assert len(frames) == 6 and gif.info["duration"] == 100 and gif.info["loop"] == 0
        rect = rects[row * 6 + 3]
        cell = sheet_rgb.crop((rect["x"], rect["y"], rect["x"] + rect["w"], rect["y"] + rect["h"]))
        assert np.abs(np.asarray(frames[3], np.int16) - np.asarray(cell, np.int16)).mean() < 8  # GIF's palette

    # Frame k of direction d was drawn from that frame's pose, in the character's prompt, from one seed.
    spec = view["request"]
    for index, frame in enumerate(spec["views"]):
        direction, k = DIRECTIONS[4][index // 6], index % 6
        assert frame["pose"] == frame_name("walk", 6, direction, k) and frame["label"] == f"{direction}-{k}"
    image = Image.open(io.BytesIO((await client.get(view["images"][8]["url"])).content))
    assert "View: w-2 (openpose pose walk-6f-w-2)" in image.info["parameters"]
    assert "a squire in red" in image.info["parameters"]
    pose = Image.open(io.BytesIO((await client.get("/v1/poses/walk-6f-w-2.png?width=64&height=64")).content))
    assert np.asarray(pose).any()

    again = await _animation(client, character, action="walk", directions=4, frames=6)
    assert again["id"] != view["id"] and await _files(client, again) == files  # the same bytes


async def test_pixel_art_frames_share_one_palette(uncached_server: RunningServer) -> None:
    client = uncached_server.client
    character = (await client.post("/v1/characters", json={"name": "imp", "description": "a fire imp"})).json()["id"]
    art = {"pixel_art": {"factor": 4, "colors": 6}}
    view = await _animation(
        client, character, action="idle", directions=1, frames=4, frame_size=32, postprocess=art, format="webp"
    )
    colours = []
    for link in view["images"]:
        with Image.open(io.BytesIO((await client.get(link["url"])).content)) as image:
            assert image.size == (32, 32)
            colours.append({tuple(c) for c in np.asarray(image.convert("RGB")).reshape(-1, 3)})
    shared = set().union(*colours)
    assert len(shared) <= 6, f"{len(shared)} colours across the frames"
    webp = Image.open(io.BytesIO((await client.get(view["animation"]["directions"]["s"])).content))
    assert webp.format == "WEBP" and getattr(webp, "n_frames", 1) == 4


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"action": "dance"}, "animation.action"),
        ({"directions": 3}, "animation.directions"),
        ({"frames": 13}, "animation.frames"),
        ({"frames": 3}, "animation.frames"),
        ({"action": ["front", "moonwalk", "back", "left"], "directions": 1}, "animation.action[1]"),
        ({"action": ["front", "back", "left", "right"], "directions": 4}, "animation.directions"),
        ({"frames": 12, "directions": 8, "frame_size": 64}, "animation.frames"),
    ],
)
async def test_bad_animations_are_refused_naming_the_field(
    server: RunningServer, fields: dict[str, Any], field: str
) -> None:
    body = {"prompt": "a knight", "width": 512, "height": 512, "steps": 150, "animation": fields}
    response = await server.client.post("/v1/generations", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == field
