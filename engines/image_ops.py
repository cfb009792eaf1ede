"""Pure image steps for game assets: trim, resize, flatten, and pixel art with exact palette compliance."""

from __future__ import annotations

import numpy as np
from PIL import Image

from engines.palettes import palette_rgb

ALPHA_VISIBLE = 128  # alpha at or above this counts as part of the character


def hex_rgb(colour: str) -> tuple[int, int, int]:
    return int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16)


def trim(image: Image.Image, padding: int) -> Image.Image:
    """Crop an RGBA image to its visible pixels plus `padding` (transparent where it runs past the edge)."""
    alpha = np.asarray(image.getchannel("A"))
    rows, cols = np.nonzero(alpha >= ALPHA_VISIBLE)
    if rows.size == 0:
        return image
    left, top = int(cols.min()) - padding, int(rows.min()) - padding
    box = (left, top, int(cols.max()) + 1 + padding, int(rows.max()) + 1 + padding)
    return image.crop(box)  # PIL fills outside the image with transparent black


def resize(
    image: Image.Image,
    width: int,
    height: int,
    mode: str,
    matte: tuple[int, int, int],
    resample: Image.Resampling = Image.Resampling.LANCZOS,
) -> Image.Image:
    """fit: inside the box, aspect kept; fill: cover the box, centre-cropped; pad: fit, then centred on a
    canvas of exactly the size (transparent, or `matte` for opaque images); stretch: exactly the size.
    `resample`: NEAREST keeps pixel art's colours."""
    if mode == "stretch":
        return image.resize((width, height), resample)
    scale = (max if mode == "fill" else min)(width / image.width, height / image.height)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    scaled = image.resize(size, resample)
    if mode == "fit":
        return scaled
    if mode == "fill":
        left, top = (size[0] - width) // 2, (size[1] - height) // 2
        return scaled.crop((left, top, left + width, top + height))
    fill = (0, 0, 0, 0) if scaled.mode == "RGBA" else matte
    canvas = Image.new(scaled.mode, (width, height), fill)
    canvas.paste(scaled, ((width - size[0]) // 2, (height - size[1]) // 2))
    return canvas


def flatten(image: Image.Image, matte: tuple[int, int, int]) -> Image.Image:
    """RGBA onto a solid colour (for JPEG, which has no transparency)."""
    if image.mode != "RGBA":
        return image.convert("RGB")
    background = Image.new("RGB", image.size, matte)
    background.paste(image, mask=image.getchannel("A"))
    return background


def _nearest(pixels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Index of the nearest palette colour (squared RGB distance) for each pixel."""
    distances = ((pixels[:, None, :].astype(np.int32) - palette[None, :, :].astype(np.int32)) ** 2).sum(axis=-1)
    return np.asarray(distances.argmin(axis=1))


def _palette_for(small: Image.Image, colors: int | None, palette: str | None) -> np.ndarray:
    if palette is not None:
        return np.array(palette_rgb(palette), dtype=np.uint8)
    quantised = small.convert("RGB").quantize(colors=colors or 16, method=Image.Quantize.MEDIANCUT)
    used = np.unique(np.asarray(quantised))
    flat = quantised.getpalette() or []
    return np.array([flat[3 * int(i) : 3 * int(i) + 3] for i in used], dtype=np.uint8)


def _art_grid(image: Image.Image, factor: int) -> Image.Image:
    return image.resize((max(1, image.width // factor), max(1, image.height // factor)), Image.Resampling.BOX)


def shared_palette(images: list[Image.Image], factor: int, colors: int | None) -> np.ndarray:
    """One palette for several images (an animation's frames), chosen from all of them at the art grid, so
    that every frame maps its colours to the same ones and the animation does not flicker."""
    grids = [np.asarray(_art_grid(image, factor).convert("RGB")).reshape(-1, 3) for image in images]
    stacked = np.concatenate(grids)[:, None, :]
    return _palette_for(Image.fromarray(stacked, "RGB"), colors, None)


def pixel_art(
    image: Image.Image,
    factor: int,
    colors: int | None,
    palette: str | None,
    outline: bool,
    colours: np.ndarray | None = None,
) -> Image.Image:
    """Downscale to the art grid (area average), map every pixel to the palette (`colours`, when given, in
    place of the named palette or the image's own), outline, scale back up with nearest neighbour. Every
    visible output pixel is a palette colour."""
    small = _art_grid(image, factor)
    grid = small.size
    has_alpha = small.mode == "RGBA"
    rgb = np.asarray(small.convert("RGB")).reshape(-1, 3)
    if colours is None:
        colours = _palette_for(small, colors, palette)
    mapped = colours[_nearest(rgb, colours)].reshape(grid[1], grid[0], 3)
    if has_alpha:
        visible = np.asarray(small.getchannel("A")) >= ALPHA_VISIBLE
        alpha = np.where(visible, 255, 0).astype(np.uint8)
        if outline:
            darkest = colours[int(colours.astype(np.int32).sum(axis=1).argmin())]
            padded = np.pad(visible, 1)
            around = padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
            edge = around & ~visible
            mapped[edge] = darkest
            alpha[edge] = 255
        art = Image.fromarray(np.dstack([mapped, alpha]), "RGBA")
    else:
        art = Image.fromarray(mapped, "RGB")
    return art.resize((grid[0] * factor, grid[1] * factor), Image.Resampling.NEAREST)
