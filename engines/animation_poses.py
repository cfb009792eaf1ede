"""Pose keyframes for animation cycles, from one 3D skeleton.

One rig (18 COCO joints in figure units: x across, y down from the top of the head to the feet, z towards
the viewer, the figure facing +z) is posed per frame by forward kinematics: each action is a function of the
cycle's phase giving hip, knee, shoulder and elbow angles, a lean and a vertical offset. The posed skeleton
is then turned about the vertical axis to face each direction and projected orthographically, so the eight
directions of a frame are views of the same body and agree with each other. Face points turned away from
the viewer are left out, as OpenPose leaves out what it cannot see (a back view has ears, no nose or eyes).

A frame's template is named `ACTION-FRAMESf-DIRECTION-INDEX`, e.g. `walk-6f-sw-2`: it is drawn like the
built-in templates (engines.poses) and can be looked at through GET /v1/poses/{name}.png.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from engines.poses import Skeleton

ACTIONS = ("idle", "walk", "run", "attack", "jump")
# Rows of a sheet in this order: the four of a 4-direction sheet first, so an 8-direction one extends it.
DIRECTIONS = {1: ("s",), 4: ("s", "w", "n", "e"), 8: ("s", "w", "n", "e", "sw", "nw", "ne", "se")}
# Degrees the figure is turned from facing the viewer; positive turns its front towards the image's right.
FACING = {"s": 0, "se": 45, "e": 90, "ne": 135, "n": 180, "nw": -135, "w": -90, "sw": -45}
DIRECTION_WORDS = {
    "s": "front view, facing the viewer",
    "w": "side view, facing left",
    "n": "back view, seen from behind",
    "e": "side view, facing right",
    "sw": "three-quarter view, facing left",
    "nw": "three-quarter back view, facing left",
    "ne": "three-quarter back view, facing right",
    "se": "three-quarter view, facing right",
}
ACTION_WORDS = {
    "idle": "standing idle",
    "walk": "walking",
    "run": "running",
    "attack": "attacking with a weapon",
    "jump": "jumping",
}
_NAME = re.compile(r"^(?P<action>[a-z]+)-(?P<frames>\d+)f-(?P<direction>[a-z]+)-(?P<index>\d+)$")

THIGH, SHIN, UPPER_ARM, FOREARM = 0.21, 0.21, 0.14, 0.13
HIP_Y, SHOULDER_Y = 0.50, 0.19

Vec = tuple[float, float, float]


@dataclass(frozen=True)
class Pose:
    """Joint angles in degrees (positive swings a limb forward, towards +z) and offsets in figure units."""

    thigh: tuple[float, float]  # right, left
    knee: tuple[float, float]  # bend: the shin swings back from the thigh
    arm: tuple[float, float]
    elbow: tuple[float, float]  # bend: the forearm swings forward from the upper arm
    lean: float = 0.0  # the upper body tipped forward about the hips
    rise: float = 0.0  # the whole figure lifted (negative: lowered)
    spread: float = 0.0  # the arms out to the sides, degrees


def _wave(phase: float, shift: float = 0.0) -> float:
    return math.sin(2 * math.pi * (phase + shift))


def _idle(t: float) -> Pose:
    breath = _wave(t)
    return Pose(thigh=(0, 0), knee=(2, 2), arm=(2 * breath, 2 * breath), elbow=(8, 8), rise=0.006 * breath, spread=6)


@dataclass(frozen=True)
class Gait:
    """A walk or run cycle: legs and arms swing in opposition, the back knee bends, the body bobs."""

    thigh: float  # swing amplitude, degrees
    knee: float  # the bend every knee keeps
    kick: float  # the bend the trailing knee adds
    arm: float
    elbow: float
    lean: float
    bob: float  # how far the body drops between strides

    def __call__(self, t: float) -> Pose:
        swing = _wave(t)
        return Pose(
            thigh=(self.thigh * swing, -self.thigh * swing),
            knee=(self.knee + self.kick * max(0.0, -_wave(t, 0.2)), self.knee + self.kick * max(0.0, _wave(t, 0.2))),
            arm=(-self.arm * swing, self.arm * swing),
            elbow=(self.elbow, self.elbow),
            lean=self.lean,
            rise=self.bob * abs(swing) - self.bob,
        )


_walk = Gait(thigh=25, knee=8, kick=30, arm=20, elbow=15, lean=0, bob=0.012)
_run = Gait(thigh=45, knee=20, kick=70, arm=45, elbow=85, lean=12, bob=0.03)


def _attack(t: float) -> Pose:
    """A two-handed overhead strike: raise (0-0.4), strike (0.4-0.6), recover (0.6-1)."""
    if t < 0.4:
        arm, lean = 170 * t / 0.4, -5 * t / 0.4
    elif t < 0.6:
        arm, lean = 170 - 140 * (t - 0.4) / 0.2, -5 + 20 * (t - 0.4) / 0.2
    else:
        arm, lean = 30 * (1 - (t - 0.6) / 0.4), 15 * (1 - (t - 0.6) / 0.4)
    return Pose(thigh=(20, -15), knee=(15, 10), arm=(arm, arm), elbow=(20, 20), lean=lean, rise=-0.02)


def _jump(t: float) -> Pose:
    """Crouch (0-0.25), push off (0.25-0.5), tuck at the top (0.5-0.75), land (0.75-1)."""
    height = max(0.0, math.sin(math.pi * (t - 0.25) / 0.75)) if t > 0.25 else 0.0
    crouch = max(0.0, math.cos(2 * math.pi * t)) if t < 0.25 or t > 0.85 else 0.0
    tuck = max(0.0, math.sin(math.pi * (t - 0.5) / 0.35)) if 0.5 < t < 0.85 else 0.0
    knee = 70 * crouch + 50 * tuck
    arms = 150 * height
    return Pose(
        thigh=(35 * crouch + 40 * tuck, 35 * crouch + 40 * tuck),
        knee=(knee, knee),
        arm=(arms - 20 * crouch, arms - 20 * crouch),
        elbow=(15, 15),
        lean=15 * crouch,
        rise=0.18 * height - 0.08 * crouch,
    )


POSES: dict[str, Callable[[float], Pose]] = {
    "idle": _idle,
    "walk": _walk,
    "run": _run,
    "attack": _attack,
    "jump": _jump,
}


def _limb(start: Vec, first: float, length: float) -> Vec:
    """The far end of a limb hanging down from `start`, swung by `first` degrees towards +z."""
    angle = math.radians(first)
    return (start[0], start[1] + length * math.cos(angle), start[2] + length * math.sin(angle))


def _lean(point: Vec, degrees: float) -> Vec:
    """Tip a point of the upper body forward about the hips."""
    angle = math.radians(degrees)
    dy, dz = point[1] - HIP_Y, point[2]
    return (point[0], HIP_Y + dy * math.cos(angle) - dz * math.sin(angle), dz * math.cos(angle) + dy * math.sin(angle))


def rig(pose: Pose) -> list[Vec]:
    """The 18 joints in 3D, COCO order, for a pose of a figure facing +z (its right side at -x)."""
    upper: dict[int, Vec] = {
        0: (0.0, 0.09, 0.05),  # nose
        1: (0.0, 0.18, 0.0),  # neck
        14: (-0.025, 0.075, 0.04),  # right eye
        15: (0.025, 0.075, 0.04),
        16: (-0.05, 0.085, 0.0),  # right ear
        17: (0.05, 0.085, 0.0),
    }
    spread = math.radians(pose.spread)
    for side, (shoulder, elbow, wrist) in ((-1, (2, 3, 4)), (1, (5, 6, 7))):
        arm, bend = pose.arm[0 if side < 0 else 1], pose.elbow[0 if side < 0 else 1]
        root = (side * 0.11, SHOULDER_Y, 0.0)
        out = side * math.sin(spread) * UPPER_ARM
        mid = _limb(root, arm, UPPER_ARM * math.cos(spread))
        mid = (mid[0] + out, mid[1], mid[2])
        end = _limb(mid, arm + bend, FOREARM)
        upper |= {shoulder: root, elbow: mid, wrist: (end[0] + out * FOREARM / UPPER_ARM, end[1], end[2])}
    joints: dict[int, Vec] = {index: _lean(point, pose.lean) for index, point in upper.items()}
    for side, (hip, knee, ankle) in ((-1, (8, 9, 10)), (1, (11, 12, 13))):
        thigh, bend = pose.thigh[0 if side < 0 else 1], pose.knee[0 if side < 0 else 1]
        root = (side * 0.06, HIP_Y, 0.0)
        mid = _limb(root, thigh, THIGH)
        joints |= {hip: root, knee: mid, ankle: _limb(mid, thigh - bend, SHIN)}
    return [(x, y - pose.rise, z) for x, y, z in (joints[index] for index in range(18))]


FACE = (0, 14, 15, 16, 17)


def project(joints: list[Vec], direction: str) -> Skeleton:
    """Turn the figure to face `direction` and look at it from the front (orthographic); hidden face points
    are None."""
    angle = math.radians(FACING[direction])
    cos, sin = math.cos(angle), math.sin(angle)
    points: list[tuple[float, float] | None] = []
    # The head's centre between the ears, wherever a lean or a jump took it.
    centre_x, centre_z = (joints[16][0] + joints[17][0]) / 2, (joints[16][2] + joints[17][2]) / 2
    for index, (x, y, z) in enumerate(joints):
        turned_x = x * cos + z * sin
        if index in FACE:
            # A face point shows when it faces the viewer (ears: also when seen edge-on).
            dx, dz = x - centre_x, z - centre_z
            facing_z = -dx * sin + dz * cos
            if facing_z < (-0.001 if index >= 16 else 0.005):
                points.append(None)
                continue
        points.append((turned_x, y))
    return tuple(points)


def frame_name(action: str, frames: int, direction: str, index: int) -> str:
    return f"{action}-{frames}f-{direction}-{index}"


def parse_frame_name(name: str) -> tuple[str, int, str, int] | None:
    """(action, frames, direction, index) of an animation frame's template name; None if it is not one."""
    match = _NAME.match(name)
    if match is None:
        return None
    action, frames, direction, index = match["action"], int(match["frames"]), match["direction"], int(match["index"])
    if action not in POSES or direction not in FACING or not 0 <= index < frames or not 1 <= frames <= 64:
        return None
    return action, frames, direction, index


def frame_skeleton(action: str, frames: int, direction: str, index: int) -> Skeleton:
    """Frame `index` of a cycle of `frames` frames, facing `direction`."""
    return project(rig(POSES[action](index / frames)), direction)
