"""Post-processing steps for one image, in order: upscale, remove background, trim, pixel art, resize.

Synchronous, like every backend: the post-processor actor runs it on its own thread. Models (upscalers,
segmentation models) are loaded on first use and kept.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from engines.background import BackgroundError, BackgroundRemover
from engines.image_filter import ImageFilter
from engines.image_ops import hex_rgb, pixel_art, resize, trim
from engines.upscale import Upscaler, UpscalerError
from forge.engine import AssetError, CancelFlag
from forge.requests import PostprocessRequest

StepFn = Callable[[str], None]
"""Called before each step with its name, for progress; what it raises stops the work there."""


def planned_steps(request: PostprocessRequest) -> list[str]:
    steps = []
    if request.upscale:
        steps.append("upscale")
    if request.remove_background:
        steps.append("remove_background")
    if request.trim:
        steps.append("trim")
    if request.pixel_art:
        steps.append("pixel_art")
    if request.resize:
        steps.append("resize")
    return steps


@dataclass(frozen=True)
class ImageFilterSettings:
    source: str
    labels: tuple[str, ...]
    threshold: float


class PostprocessTools:
    def __init__(
        self,
        upscalers: Path,
        background_models: Path,
        device: str,
        tile: int,
        image_filter: ImageFilterSettings | None = None,
    ) -> None:
        self._filter_settings = image_filter
        self._image_filter: ImageFilter | None = None
        self.upscalers_dir = upscalers
        self.background_dir = background_models
        self.device = device
        self.tile = tile
        self._upscalers: dict[Path, Upscaler] = {}
        self._removers: dict[Path, BackgroundRemover] = {}

    def screen(self, images: list[Image.Image]) -> str | None:
        """Why the first unsafe image is unsafe, or None (also when no image filter is configured)."""
        settings = self._filter_settings
        if settings is None:
            return None
        if self._image_filter is None:
            try:
                self._image_filter = ImageFilter(settings.source, self.device, settings.labels, settings.threshold)
            except Exception as exc:  # transformers raises many types for a missing or broken model
                raise AssetError(
                    "image_filter_unavailable", f"the image filter {settings.source} failed to load: {exc}"
                ) from exc
        for index, image in enumerate(images):
            found = self._image_filter.flagged(image)
            if found is not None:
                label, score = found
                return f"image {index} was classified {label!r} ({score:.2f}); it was not stored"
        return None

    def upscaler(self, path: Path) -> Upscaler:
        if path not in self._upscalers:
            if not path.is_file():
                raise AssetError("postprocess_model_missing", f"the upscaler file {path} is missing")
            try:
                self._upscalers[path] = Upscaler(path, self.device, tile=self.tile)
            except UpscalerError as exc:
                raise AssetError("postprocess_model_invalid", str(exc)) from exc
        return self._upscalers[path]

    def remover(self, name: str, path: Path) -> BackgroundRemover:
        if path not in self._removers:
            if not path.is_file():
                raise AssetError("postprocess_model_missing", f"the background model file {path} is missing")
            try:
                self._removers[path] = BackgroundRemover(name, path, self.device)
            except BackgroundError as exc:
                raise AssetError("postprocess_model_invalid", str(exc)) from exc
        return self._removers[path]

    def apply(
        self,
        image: Image.Image,
        request: PostprocessRequest,
        upscaler: Path | None,
        background: Path | None,
        on_step: StepFn,
        cancel: CancelFlag,
        palette: np.ndarray | None = None,
    ) -> tuple[Image.Image, list[str]]:
        """The processed image and a line per applied step, for the metadata. Setting `cancel` ends the work
        with JobCancelled inside the long steps too: at the next upscaling tile, or by interrupting the
        segmentation model's run."""
        applied: list[str] = []
        # 1. Super-resolution.
        if request.upscale and upscaler is not None:
            on_step("upscale")
            image = self.upscaler(upscaler)(image, request.upscale, cancel.raise_if_set)
            applied.append(f"upscale x{request.upscale} ({upscaler.stem})")
        # 2. Background removal: RGBA from here on.
        if request.remove_background and background is not None:
            on_step("remove_background")
            image = self.remover(request.background_model or background.stem, background)(image, cancel)
            applied.append(f"remove_background ({background.stem})")
        # 3. Trim to the character's box.
        if request.trim:
            on_step("trim")
            image = trim(image, request.trim_padding)
            applied.append(f"trim (padding {request.trim_padding})")
        # 4. Pixel art.
        if request.pixel_art:
            on_step("pixel_art")
            art = request.pixel_art
            image = pixel_art(image, art.factor, art.colors, art.palette, art.outline, palette)
            colours = f"palette {art.palette}" if art.palette else f"{art.colors or 16} colours"
            colours += ", shared by every frame" if palette is not None and not art.palette else ""
            applied.append(f"pixel_art (factor {art.factor}, {colours}{', outline' if art.outline else ''})")
        # 5. Final size.
        if request.resize:
            on_step("resize")
            size = request.resize
            # Pixel art keeps its palette: nearest neighbour, never a filter that blends new colours in.
            resample = Image.Resampling.NEAREST if request.pixel_art else Image.Resampling.LANCZOS
            image = resize(image, size.width, size.height, size.mode, hex_rgb(request.matte), resample)
            applied.append(f"resize {size.width}x{size.height} {size.mode}")
        return image, applied
