"""Post-processing cost per 1024x1024 image on this machine, one JSON line.

Upscaling uses the real Real-ESRGAN architectures (RRDBNet, 23 blocks, 64 features) with random
weights: the time is the real cost, the pixels are not. It runs tile by tile as the server does; a few
tiles are timed and the whole image is extrapolated from them, because a full 1024x1024 x4 pass takes
minutes on a small CPU. Background removal uses the project's tiny segmentation stand-in (U^2-Net's
weights are not available here), so its number measures rembg's own overhead, not the network.
"""

from __future__ import annotations

import io
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from actors.encoding import encode_image
from engines.background import BackgroundRemover
from engines.image_ops import pixel_art, resize, trim
from engines.sprite_sheet import pack
from engines.tiny_extras import build_tiny_segmenter
from engines.upscale import Upscaler

SIDE = 1024
TILE = 128
TIMED_TILES = 2


def _seconds(fn: Callable[[], Any], repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def _character() -> Image.Image:
    rng = np.random.RandomState(0)
    image = Image.fromarray((rng.rand(SIDE, SIDE, 3) * 60).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    draw.rectangle((380, 250, 640, 960), fill=(220, 90, 60))
    draw.ellipse((420, 80, 600, 260), fill=(250, 215, 180))
    return image


def _upscale_seconds(folder: Path, scale: int) -> float:
    """Seconds for one SIDE x SIDE image, from TIMED_TILES tiles of TILE pixels (with the server's overlap)."""
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(0)
    model = ESRGAN(num_filters=64, num_blocks=23, scale=scale, shuffle_factor=2 if scale == 2 else None)
    path = folder / f"x{scale}.pth"
    torch.save({"params_ema": model.state_dict()}, path)
    upscaler = Upscaler(path, "cpu", tile=0)
    tile = Image.fromarray((np.random.RandomState(1).rand(TILE + 32, TILE + 32, 3) * 255).astype(np.uint8))
    per_tile = _seconds(lambda: upscaler(tile, scale), repeat=TIMED_TILES)
    return per_tile * (SIDE // TILE) ** 2


def main() -> None:
    image = _character()
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        remover = BackgroundRemover("u2net", build_tiny_segmenter(folder / "rembg" / "u2net.onnx"), "cpu")
        cutout = remover(image)
        times = {
            "remove_background_s (tiny stand-in)": _seconds(lambda: remover(image)),
            "trim_s": _seconds(lambda: trim(cutout, 8)),
            "pixel_art_s (factor 8, pico-8, outline)": _seconds(lambda: pixel_art(cutout, 8, None, "pico-8", True)),
            "pixel_art_s (factor 8, 16 colours)": _seconds(lambda: pixel_art(image, 8, 16, None, False)),
            "resize_s (pad to 512)": _seconds(lambda: resize(cutout, 512, 512, "pad", (255, 255, 255))),
            "encode_png_s": _seconds(lambda: encode_image(cutout, "png", "x")),
            "encode_webp_lossless_s": _seconds(lambda: encode_image(cutout, "webp", "x", lossless=True), repeat=1),
            "encode_jpeg_s": _seconds(lambda: encode_image(cutout, "jpeg", "x")),
            "sprite_sheet_s (4 frames)": _seconds(
                lambda: pack([(str(i), cutout) for i in range(4)], "s.png", 2, 2)[0].save(io.BytesIO(), "PNG")
            ),
            "upscale_x2_s (RealESRGAN_x2plus architecture, extrapolated)": _upscale_seconds(folder, 2),
            "upscale_x4_s (RealESRGAN_x4plus architecture, extrapolated)": _upscale_seconds(folder, 4),
        }
    result = {
        "image": f"{SIDE}x{SIDE}",
        "cpu_threads": torch.get_num_threads(),
        "upscale_tile": TILE,
        **{name: round(seconds, 4) for name, seconds in times.items()},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
