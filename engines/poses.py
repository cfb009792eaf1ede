"""Built-in OpenPose skeletons, drawn from keypoints the way OpenPose (and the SDXL openpose ControlNets'
training data) draws them: 18 COCO body points, coloured limbs as filled ellipses, a dot per joint.

Templates cover the views a turnaround sheet needs and a few action poses, so pose control works with no
detector. Coordinates are in figure units: height 1 from the top of the head (y=0) to the feet (y=1),
x=0 at the figure's centre line; the image's left is negative x.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

Point = tuple[float, float] | None
# COCO order: nose, neck, right shoulder/elbow/wrist, left shoulder/elbow/wrist, right hip/knee/ankle,
# left hip/knee/ankle, right eye, left eye, right ear, left ear.
KEYPOINT_NAMES = (
    "nose", "neck", "r_shoulder", "r_elbow", "r_wrist", "l_shoulder", "l_elbow", "l_wrist",
    "r_hip", "r_knee", "r_ankle", "l_hip", "l_knee", "l_ankle", "r_eye", "l_eye", "r_ear", "l_ear",
)  # fmt: skip
# Limbs as (from, to) keypoint indexes, in OpenPose's drawing order; colour i goes with limb i.
LIMBS = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10),
    (1, 11), (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
)  # fmt: skip
COLORS = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
    (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
    (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)  # fmt: skip

Skeleton = tuple[Point, ...]


def _mirror(skeleton: Skeleton, swap_sides: bool) -> Skeleton:
    """Reflect left-right; with swap_sides, left and right joints also trade places."""
    flipped: list[Point] = [None if p is None else (-p[0], p[1]) for p in skeleton]
    if swap_sides:
        for a, b in ((2, 5), (3, 6), (4, 7), (8, 11), (9, 12), (10, 13), (14, 15), (16, 17)):
            flipped[a], flipped[b] = flipped[b], flipped[a]
    return tuple(flipped)


FRONT: Skeleton = (
    (0.0, 0.09), (0.0, 0.18), (-0.11, 0.19), (-0.14, 0.33), (-0.15, 0.46), (0.11, 0.19), (0.14, 0.33),
    (0.15, 0.46), (-0.06, 0.50), (-0.07, 0.71), (-0.07, 0.92), (0.06, 0.50), (0.07, 0.71), (0.07, 0.92),
    (-0.025, 0.075), (0.025, 0.075), (-0.05, 0.085), (0.05, 0.085),
)  # fmt: skip
# Facing the image's left: the figure's left side is nearest; its right eye and ear are hidden.
LEFT: Skeleton = (
    (-0.055, 0.09), (0.0, 0.18), (-0.01, 0.19), (0.0, 0.33), (0.01, 0.46), (0.01, 0.19), (0.02, 0.33),
    (0.03, 0.46), (-0.01, 0.50), (-0.03, 0.71), (-0.01, 0.92), (0.01, 0.50), (0.0, 0.71), (0.02, 0.92),
    None, (-0.035, 0.075), None, (0.015, 0.085),
)  # fmt: skip
THREE_QUARTER: Skeleton = (
    (-0.035, 0.09), (0.0, 0.18), (-0.07, 0.19), (-0.10, 0.33), (-0.11, 0.46), (0.09, 0.19), (0.11, 0.33),
    (0.12, 0.46), (-0.035, 0.50), (-0.045, 0.71), (-0.05, 0.92), (0.05, 0.50), (0.06, 0.71), (0.06, 0.92),
    (-0.05, 0.075), (0.0, 0.075), None, (0.035, 0.085),
)  # fmt: skip
T_POSE: Skeleton = (
    (0.0, 0.09), (0.0, 0.18), (-0.11, 0.19), (-0.25, 0.19), (-0.39, 0.19), (0.11, 0.19), (0.25, 0.19),
    (0.39, 0.19), (-0.06, 0.50), (-0.07, 0.71), (-0.07, 0.92), (0.06, 0.50), (0.07, 0.71), (0.07, 0.92),
    (-0.025, 0.075), (0.025, 0.075), (-0.05, 0.085), (0.05, 0.085),
)  # fmt: skip
RUN: Skeleton = (
    (-0.08, 0.10), (-0.03, 0.19), (-0.05, 0.20), (0.06, 0.30), (0.0, 0.40), (-0.01, 0.20), (-0.12, 0.28),
    (-0.19, 0.20), (0.0, 0.50), (-0.16, 0.64), (-0.12, 0.86), (0.02, 0.50), (0.14, 0.66), (0.28, 0.74),
    None, (-0.06, 0.085), None, (-0.01, 0.095),
)  # fmt: skip
JUMP: Skeleton = (
    (0.0, 0.07), (0.0, 0.16), (-0.11, 0.17), (-0.20, 0.07), (-0.26, -0.04), (0.11, 0.17), (0.20, 0.07),
    (0.26, -0.04), (-0.06, 0.47), (-0.16, 0.60), (-0.10, 0.78), (0.06, 0.47), (0.16, 0.60), (0.10, 0.78),
    (-0.025, 0.055), (0.025, 0.055), (-0.05, 0.065), (0.05, 0.065),
)  # fmt: skip
# A two-handed overhead strike, weight on the front foot.
ATTACK: Skeleton = (
    (-0.03, 0.12), (0.0, 0.21), (-0.10, 0.22), (-0.13, 0.10), (-0.06, 0.0), (0.10, 0.22), (0.05, 0.10),
    (-0.03, 0.01), (-0.06, 0.52), (-0.20, 0.70), (-0.26, 0.92), (0.06, 0.52), (0.12, 0.72), (0.22, 0.92),
    (-0.05, 0.10), (0.0, 0.10), None, (0.035, 0.11),
)  # fmt: skip
# Spell casting: both hands thrust forward to the image's left, in a wide stance.
CAST: Skeleton = (
    (-0.03, 0.09), (0.0, 0.18), (-0.09, 0.19), (-0.20, 0.24), (-0.32, 0.22), (0.09, 0.19), (-0.04, 0.27),
    (-0.30, 0.28), (-0.05, 0.50), (-0.14, 0.70), (-0.20, 0.92), (0.05, 0.50), (0.12, 0.70), (0.17, 0.92),
    (-0.045, 0.075), (0.0, 0.075), None, (0.035, 0.085),
)  # fmt: skip

TEMPLATES: dict[str, Skeleton] = {
    "front": FRONT,
    # Seen from behind, the figure's right side is on the image's right: a plain reflection, face hidden.
    "back": _mirror(tuple(None if i in (0, 14, 15) else p for i, p in enumerate(FRONT)), swap_sides=False),
    "left": LEFT,
    # Facing right, the figure's right side is the near one: reflect, then trade sides.
    "right": _mirror(LEFT, swap_sides=True),
    "three-quarter": THREE_QUARTER,
    "t-pose": T_POSE,
    "run": RUN,
    "jump": JUMP,
    "attack": ATTACK,
    "cast": CAST,
}
TURNAROUND = ("front", "three-quarter", "left", "back")
POSE_NAMES = (*TEMPLATES, "turnaround")
DESCRIPTIONS = {
    "front": "standing, facing the viewer",
    "back": "standing, seen from behind",
    "left": "side view facing left",
    "right": "side view facing right",
    "three-quarter": "standing, turned three-quarters to the left",
    "t-pose": "arms straight out, for model sheets and rigging",
    "run": "running to the left",
    "jump": "jumping, arms up",
    "attack": "two-handed overhead strike",
    "cast": "casting a spell, hands thrust forward",
    "turnaround": "front, three-quarter, side and back in a row, for character sheets",
}


def _draw(canvas: np.ndarray, skeleton: Skeleton, centre_x: float, top: float, height: float) -> None:
    import cv2

    def pixel(point: tuple[float, float]) -> tuple[float, float]:
        return centre_x + point[0] * height, top + point[1] * height

    stick = max(1, round(4 * height / 460))  # OpenPose's 4 px at the ~460 px figure of a 512 image
    joint = max(1, round(4 * height / 460))
    for (a, b), color in zip(LIMBS, COLORS, strict=False):
        start, end = skeleton[a], skeleton[b]
        if start is None or end is None:
            continue
        (x0, y0), (x1, y1) = pixel(start), pixel(end)
        length = math.hypot(x0 - x1, y0 - y1)
        angle = math.degrees(math.atan2(y0 - y1, x0 - x1))
        polygon = cv2.ellipse2Poly(
            (round((x0 + x1) / 2), round((y0 + y1) / 2)), (round(length / 2), stick), round(angle), 0, 360, 1
        )
        cv2.fillConvexPoly(canvas, np.asarray(polygon), tuple(float(round(c * 0.6)) for c in color))
    for point, color in zip(skeleton, COLORS, strict=True):
        if point is not None:
            x, y = pixel(point)
            cv2.circle(canvas, (round(x), round(y)), joint, tuple(float(c) for c in color), thickness=-1)


def is_pose(name: str) -> bool:
    """A built-in template, or an animation cycle's frame (engines.animation_poses)."""
    from engines.animation_poses import parse_frame_name

    return name in POSE_NAMES or parse_frame_name(name) is not None


def render_pose(name: str, width: int, height: int) -> Image.Image:
    """Draw a template (or the turnaround row, or an animation frame) as an RGB control image of the size."""
    from engines.animation_poses import frame_skeleton, parse_frame_name

    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    if (frame := parse_frame_name(name)) is not None:
        # Every frame of every cycle at one scale and ground line, with room above for a jump's raised arms.
        figure = min(0.72 * height, width / 0.9)
        _draw(canvas, frame_skeleton(*frame), width / 2, height - 1.06 * figure, figure)
        return Image.fromarray(canvas)
    if name not in POSE_NAMES:
        raise KeyError(name)
    names: Sequence[str] = TURNAROUND if name == "turnaround" else (name,)
    column = width / len(names)
    figure = min(0.86 * height, column / 0.8)  # the widest template spans about 0.8 figure heights
    top = (height - figure) / 2 + 0.04 * figure  # room above for raised hands
    for index, template in enumerate(names):
        _draw(canvas, TEMPLATES[template], column * (index + 0.5), top, figure)
    return Image.fromarray(canvas)
