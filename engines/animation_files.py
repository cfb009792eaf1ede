"""An animation's files beside its sprite sheet: an animated GIF or WebP per direction, and the sheet's atlas
in the two forms game engines import directly.

- Aseprite's JSON export (array form, with a frame tag per direction): read by Aseprite importers for Unity,
  Godot, Phaser, LÖVE, Defold and most 2D toolkits, so one file covers the engines without a format of their
  own here.
- Godot 4's `SpriteFrames` resource (`.tres`): an AnimatedSprite2D plays it as is, an animation per
  direction, with no plugin. Put it beside the sheet: its texture is the sheet, by a relative path.
"""

from __future__ import annotations

import io
from typing import Any

from PIL import Image

SHEET_IMAGE = "sprite-sheet.png"


def animated(frames: list[Image.Image], frame_ms: int, format: str) -> bytes:
    """One direction's frames as a looping GIF or lossless WebP."""
    buffer = io.BytesIO()
    first, rest = frames[0], frames[1:]
    if format == "gif":
        first.save(
            buffer,
            format="GIF",
            save_all=True,
            append_images=rest,
            duration=frame_ms,
            loop=0,
            disposal=2,
            optimize=False,
        )
    else:
        first.save(buffer, format="WEBP", save_all=True, append_images=rest, duration=frame_ms, loop=0, lossless=True)
    return buffer.getvalue()


def _rects(document: dict[str, Any]) -> list[dict[str, int]]:
    """The frames' rectangles on the sheet, in the order they were packed."""
    return [entry["frame"] for entry in document["frames"].values()]


def aseprite_json(
    document: dict[str, Any], directions: tuple[str, ...], frames: int, frame_ms: int, tag_prefix: str
) -> dict[str, Any]:
    """Aseprite's `--format json-array` export of the sheet, with a `PREFIX_DIRECTION` tag per direction."""
    rects = _rects(document)
    entries = []
    for index, rect in enumerate(rects):
        direction, frame = divmod(index, frames)
        entries.append(
            {
                "filename": f"{tag_prefix}_{directions[direction]} {frame}.aseprite",
                "frame": dict(rect),
                "rotated": False,
                "trimmed": False,
                "spriteSourceSize": {"x": 0, "y": 0, "w": rect["w"], "h": rect["h"]},
                "sourceSize": {"w": rect["w"], "h": rect["h"]},
                "duration": frame_ms,
            }
        )
    tags = [
        {
            "name": f"{tag_prefix}_{direction}",
            "from": row * frames,
            "to": row * frames + frames - 1,
            "direction": "forward",
        }
        for row, direction in enumerate(directions)
    ]
    meta = document["meta"]
    return {
        "frames": entries,
        "meta": {
            "app": "https://www.aseprite.org/",
            "version": "1.3",
            "image": SHEET_IMAGE,
            "format": "RGBA8888",
            "size": dict(meta["size"]),
            "scale": "1",
            "frameTags": tags,
            "layers": [{"name": "Layer", "opacity": 255, "blendMode": "normal"}],
            "slices": [],
        },
    }


def godot_sprite_frames(
    document: dict[str, Any], directions: tuple[str, ...], frames: int, frame_ms: int, name_prefix: str
) -> str:
    """A Godot 4 SpriteFrames resource: an AtlasTexture per frame (a region of the sheet) and a looping
    animation per direction at the frames' rate."""
    rects = _rects(document)
    lines = [f'[gd_resource type="SpriteFrames" load_steps={len(rects) + 2} format=3]', ""]
    lines += [f'[ext_resource type="Texture2D" path="{SHEET_IMAGE}" id="1_sheet"]', ""]
    for index, rect in enumerate(rects):
        lines += [
            f'[sub_resource type="AtlasTexture" id="AtlasTexture_{index}"]',
            'atlas = ExtResource("1_sheet")',
            f"region = Rect2({rect['x']}, {rect['y']}, {rect['w']}, {rect['h']})",
            "",
        ]
    animations = []
    speed = 1000 / frame_ms
    for row, direction in enumerate(directions):
        textures = ", ".join(
            f'{{\n"duration": 1.0,\n"texture": SubResource("AtlasTexture_{row * frames + frame}")\n}}'
            for frame in range(frames)
        )
        animations.append(
            f'{{\n"frames": [{textures}],\n"loop": true,\n"name": &"{name_prefix}_{direction}",\n"speed": {speed:g}\n}}'
        )
    lines += ["[resource]", f"animations = [{', '.join(animations)}]", ""]
    return "\n".join(lines)
