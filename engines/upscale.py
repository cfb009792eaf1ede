"""Super-resolution with Real-ESRGAN-family weights loaded through spandrel, tiled so memory stays bounded
whatever the image size. Alpha, when present, is resized separately (the models see RGB only)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

UPSCALER_SUFFIXES = (".pth", ".safetensors", ".pt", ".ckpt")


def _nothing() -> None:
    pass


class UpscalerError(Exception):
    pass


class Upscaler:
    def __init__(self, path: Path, device: str, tile: int = 256, overlap: int = 16) -> None:
        from spandrel import ImageModelDescriptor, ModelLoader

        try:
            descriptor = ModelLoader(device=torch.device(device)).load_from_file(path)
        except Exception as exc:  # spandrel raises for unknown architectures, torch for damaged files
            raise UpscalerError(f"{path} is not a loadable upscaler: {type(exc).__name__}: {exc}") from exc
        if not isinstance(descriptor, ImageModelDescriptor):
            raise UpscalerError(f"{path} is not a single-image model ({type(descriptor).__name__})")
        self.model: Any = descriptor.eval()
        self.scale: int = descriptor.scale
        self.device = device
        self.half = device.startswith("cuda") and descriptor.supports_half
        if self.half:
            self.model.half()
        self.tile = tile
        self.overlap = overlap

    def __call__(self, image: Image.Image, factor: int, before_tile: Callable[[], None] | None = None) -> Image.Image:
        """`factor` times larger: the model's own scale, then Lanczos down to `factor` if they differ.
        `before_tile` runs before each tile; what it raises ends the upscale there (a cancelled task)."""
        rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        tensor = torch.from_numpy(rgb).permute(2, 0, 1)[None].to(self.device)
        with torch.inference_mode():
            output = self._tiled(tensor.half() if self.half else tensor, before_tile or _nothing)
        array = (output[0].float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
        result = Image.fromarray(array, "RGB")
        size = (image.width * factor, image.height * factor)
        if result.size != size:
            result = result.resize(size, Image.Resampling.LANCZOS)
        if image.mode == "RGBA":
            result.putalpha(image.getchannel("A").resize(size, Image.Resampling.LANCZOS))
        return result

    def _tiled(self, x: torch.Tensor, before_tile: Callable[[], None]) -> torch.Tensor:
        """Run tile by tile, each with `overlap` pixels of context that are cut away from its output."""
        _, channels, height, width = x.shape
        if not self.tile or (height <= self.tile and width <= self.tile):
            before_tile()
            return self.model(x)  # type: ignore[no-any-return]
        scale, tile, pad = self.scale, self.tile, self.overlap
        output = x.new_zeros((1, channels, height * scale, width * scale))
        for top in range(0, height, tile):
            for left in range(0, width, tile):
                before_tile()
                bottom, right = min(top + tile, height), min(left + tile, width)
                y0, x0 = max(top - pad, 0), max(left - pad, 0)
                y1, x1 = min(bottom + pad, height), min(right + pad, width)
                result = self.model(x[:, :, y0:y1, x0:x1])
                inner = result[
                    :, :, (top - y0) * scale : (bottom - y0) * scale, (left - x0) * scale : (right - x0) * scale
                ]
                output[:, :, top * scale : bottom * scale, left * scale : right * scale] = inner
        return output
