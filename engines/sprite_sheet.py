"""Pack frames into one atlas with a TexturePacker "hash" JSON frame map (what Phaser and PixiJS load)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from PIL import Image


def pack(
    frames: Sequence[tuple[str, Image.Image]], image_name: str, columns: int | None, padding: int
) -> tuple[Image.Image, dict[str, Any]]:
    """A grid of cells the size of the largest frame, each frame centred in its cell; returns the atlas
    (RGBA) and its JSON document."""
    columns = columns or math.ceil(math.sqrt(len(frames)))
    rows = math.ceil(len(frames) / columns)
    cell_w = max(image.width for _, image in frames)
    cell_h = max(image.height for _, image in frames)
    width = columns * cell_w + (columns + 1) * padding
    height = rows * cell_h + (rows + 1) * padding
    atlas = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    entries: dict[str, Any] = {}
    for index, (name, image) in enumerate(frames):
        row, column = divmod(index, columns)
        x = padding + column * (cell_w + padding) + (cell_w - image.width) // 2
        y = padding + row * (cell_h + padding) + (cell_h - image.height) // 2
        atlas.paste(image.convert("RGBA"), (x, y))
        entries[name] = {
            "frame": {"x": x, "y": y, "w": image.width, "h": image.height},
            "rotated": False,
            "trimmed": False,
            "spriteSourceSize": {"x": 0, "y": 0, "w": image.width, "h": image.height},
            "sourceSize": {"w": image.width, "h": image.height},
            "pivot": {"x": 0.5, "y": 0.5},
        }
    document = {
        "frames": entries,
        "meta": {
            "app": "chara-forge",
            "version": "1.0",
            "image": image_name,
            "format": "RGBA8888",
            "size": {"w": width, "h": height},
            "scale": "1",
        },
    }
    return atlas, document
