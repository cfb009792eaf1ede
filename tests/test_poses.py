"""Built-in OpenPose templates: pixel-exact against golden files, and skeletons where a reader expects them."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engines.poses import COLORS, KEYPOINT_NAMES, POSE_NAMES, TEMPLATES, TURNAROUND, render_pose
from tests.conftest import RunningServer

GOLDEN = Path(__file__).parent / "golden" / "poses"
SIZES = {"turnaround": (384, 160)}
DEFAULT_SIZE = (128, 192)
# Set to rewrite the golden files after an intended change to the drawing; review the PNGs before committing.
UPDATE = os.environ.get("FORGE_UPDATE_GOLDEN") == "1"


@pytest.mark.parametrize("name", POSE_NAMES)
def test_templates_match_their_golden_images(name: str) -> None:
    width, height = SIZES.get(name, DEFAULT_SIZE)
    rendered = render_pose(name, width, height)
    golden = GOLDEN / f"{name}.png"
    if UPDATE:
        rendered.save(golden)
    with Image.open(golden) as expected:
        assert expected.size == rendered.size
        assert np.array_equal(np.asarray(expected.convert("RGB")), np.asarray(rendered))


def _joint_pixel(name: str, keypoint: str, width: int, height: int) -> tuple[int, int]:
    """Where render_pose puts a keypoint of a single-figure template."""
    x, y = TEMPLATES[name][KEYPOINT_NAMES.index(keypoint)] or (0.0, 0.0)
    figure = min(0.86 * height, width / 0.8)
    top = (height - figure) / 2 + 0.04 * figure
    return round(width / 2 + x * figure), round(top + y * figure)


def test_front_view_has_each_joint_in_its_openpose_colour() -> None:
    image = np.asarray(render_pose("front", 512, 768))
    for keypoint in ("nose", "neck", "r_wrist", "l_ankle", "r_eye", "l_ear"):
        x, y = _joint_pixel("front", keypoint, 512, 768)
        assert tuple(image[y, x]) == COLORS[KEYPOINT_NAMES.index(keypoint)], keypoint
    # The figure's right wrist is on the image's left: a front view faces the viewer.
    assert _joint_pixel("front", "r_wrist", 512, 768)[0] < 256 < _joint_pixel("front", "l_wrist", 512, 768)[0]


def test_back_view_has_no_face_and_mirrored_sides() -> None:
    back = TEMPLATES["back"]
    for keypoint in ("nose", "r_eye", "l_eye"):
        assert back[KEYPOINT_NAMES.index(keypoint)] is None
    assert _joint_pixel("back", "r_wrist", 512, 768)[0] > 256  # seen from behind, the right hand is on the right
    nose_colour = np.array(COLORS[0])
    assert not (np.asarray(render_pose("back", 512, 768)) == nose_colour).all(axis=-1).any()


def test_turnaround_draws_its_views_side_by_side() -> None:
    image = np.asarray(render_pose("turnaround", 800, 200))
    columns = np.array_split(image, len(TURNAROUND), axis=1)
    for view, column in zip(TURNAROUND, columns, strict=True):
        alone = np.asarray(render_pose(view, column.shape[1], 200))
        assert column.any() and (column > 0).sum() == pytest.approx((alone > 0).sum(), rel=0.25), view


def test_unknown_pose_is_refused() -> None:
    with pytest.raises(KeyError):
        render_pose("moonwalk", 64, 64)


@pytest.mark.anyio
async def test_poses_over_rest(server: RunningServer) -> None:
    listing = (await server.client.get("/v1/poses")).json()["items"]
    assert [pose["name"] for pose in listing] == list(POSE_NAMES)
    response = await server.client.get("/v1/poses/jump.png", params={"width": 256, "height": 384})
    assert response.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(response.content)) as image:
        assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(render_pose("jump", 256, 384)))
    missing = await server.client.get("/v1/poses/moonwalk.png")
    assert missing.status_code == 404 and missing.json()["error"]["field"] == "name"
    too_big = await server.client.get("/v1/poses/jump.png", params={"width": 99999})
    assert too_big.status_code == 422 and too_big.json()["error"]["field"] == "width"
