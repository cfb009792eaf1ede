"""Post-processing steps on their own: upscaling through spandrel, background removal through rembg,
pixel art, trim, resize, sprite sheets, and encoding with metadata."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from actors.encoding import encode_image, read_parameters
from engines.background import BackgroundRemover
from engines.image_ops import pixel_art, resize, trim
from engines.palettes import PALETTES, palette_rgb
from engines.sprite_sheet import pack
from engines.upscale import Upscaler
from forge.requests import PALETTE_NAMES


def _noise(width: int, height: int, seed: int = 0, alpha: bool = False) -> Image.Image:
    pixels = (np.random.RandomState(seed).rand(height, width, 4 if alpha else 3) * 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGBA" if alpha else "RGB")


def _figure(size: tuple[int, int] = (96, 128), box: tuple[int, int, int, int] = (30, 20, 65, 110)) -> Image.Image:
    """A bright figure on a dark background, with transparency outside it."""
    image = Image.new("RGBA", size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    draw.rectangle(box, fill=(230, 80, 60, 255))
    draw.ellipse((box[0] + 5, box[1] - 15, box[2] - 5, box[1] + 15), fill=(250, 220, 180, 255))
    return image


@pytest.mark.parametrize(("name", "scale"), [("RealESRGAN_x4plus", 4), ("RealESRGAN_x2plus", 2)])
def test_rrdbnet_weights_load_through_spandrel_and_upscale(postprocess_models: Path, name: str, scale: int) -> None:
    path = postprocess_models / "upscalers" / f"{name}.pth"
    whole = Upscaler(path, "cpu", tile=0)
    assert whole.scale == scale
    image = _noise(70, 45)
    untiled = np.asarray(whole(image, scale)).astype(int)
    tiled = np.asarray(Upscaler(path, "cpu", tile=24, overlap=12)(image, scale)).astype(int)
    assert untiled.shape == (45 * scale, 70 * scale, 3)
    difference = np.abs(untiled - tiled)
    print(f"{name}: tiled vs whole, max {difference.max()}, mean {difference.mean():.4f} (of 255)")
    assert difference.mean() < 0.5 and difference.max() <= 8


def test_a_x4_model_makes_x2_and_alpha_follows(postprocess_models: Path) -> None:
    upscaler = Upscaler(postprocess_models / "upscalers" / "RealESRGAN_x4plus.pth", "cpu", tile=32)
    result = upscaler(_figure(), 2)
    assert result.size == (192, 256) and result.mode == "RGBA"
    alpha = np.asarray(result.getchannel("A"))
    assert alpha[130, 95] == 255 and alpha[5, 5] == 0


def test_a_damaged_upscaler_file_is_a_clear_error(tmp_path: Path) -> None:
    from engines.upscale import UpscalerError

    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UpscalerError, match=r"broken\.pth"):
        Upscaler(bad, "cpu")


@pytest.mark.parametrize("name", ["isnet-general-use", "isnet-anime", "u2net"])
def test_background_removal_alpha_follows_the_mask(postprocess_models: Path, name: str) -> None:
    remover = BackgroundRemover(name, postprocess_models / "rembg" / f"{name}.onnx", "cpu")
    image = Image.new("RGB", (160, 120), "black")
    ImageDraw.Draw(image).rectangle((50, 30, 110, 90), fill="white")  # the tiny model's mask is brightness
    alpha = np.asarray(remover(image).getchannel("A"))
    assert alpha[40:80, 60:100].min() >= 250  # inside the subject
    assert alpha[:15].max() <= 5 and alpha[:, :30].max() <= 5  # well outside it


@pytest.mark.parametrize("palette", PALETTE_NAMES)
def test_pixel_art_uses_only_palette_colours(palette: str) -> None:
    art = pixel_art(_noise(120, 96), factor=6, colors=None, palette=palette, outline=False)
    assert art.size == (120, 96)
    colours = {tuple(c) for c in np.asarray(art).reshape(-1, 3)}
    assert colours <= set(palette_rgb(palette))


def test_pixel_art_grid_colour_count_and_outline() -> None:
    art = np.asarray(pixel_art(_figure(), factor=4, colors=5, palette=None, outline=False))
    blocks = art.reshape(32, 4, 24, 4, 4)
    assert (blocks == blocks[:, :1, :, :1, :]).all()  # every 4x4 block is one art pixel
    visible = art[..., 3] == 255
    assert len({tuple(c) for c in art[visible][:, :3]}) <= 5

    outlined = np.asarray(pixel_art(_figure(), factor=4, colors=None, palette="pico-8", outline=True))
    darkest = min(palette_rgb("pico-8"), key=sum)
    ring = (outlined[..., 3] == 255) & (art[..., 3] == 0)
    assert ring.any() and (outlined[ring][:, :3] == darkest).all()
    assert {tuple(c) for c in outlined[outlined[..., 3] == 255][:, :3]} <= set(palette_rgb("pico-8"))


def test_palette_names_match_the_data() -> None:
    assert set(PALETTE_NAMES) == set(PALETTES)
    assert len(PALETTES["pico-8"]) == 16 and len(PALETTES["endesga-32"]) == 32 and len(PALETTES["game-boy"]) == 4


def test_trim_keeps_the_character_and_padding() -> None:
    trimmed = trim(_figure(), padding=4)
    alpha = np.asarray(_figure().getchannel("A"))
    rows, cols = np.nonzero(alpha)
    assert trimmed.size == (cols.max() - cols.min() + 1 + 8, rows.max() - rows.min() + 1 + 8)
    assert np.asarray(trimmed.getchannel("A"))[:4].max() == 0


@pytest.mark.parametrize(
    ("mode", "size"), [("fit", (60, 80)), ("fill", (100, 100)), ("pad", (100, 100)), ("stretch", (100, 100))]
)
def test_resize_modes(mode: str, size: tuple[int, int]) -> None:
    result = resize(_figure((96, 128)), 100, 100 if mode != "fit" else 80, mode, (255, 255, 255))
    assert result.size == size
    if mode == "pad":
        assert np.asarray(result.getchannel("A"))[:, :5].max() == 0  # transparent bars at the sides


def test_sprite_sheet_json_locates_each_frame() -> None:
    frames = [(f"hero/{i}", _noise(40 + 8 * i, 50, seed=i, alpha=True)) for i in range(5)]
    atlas, document = pack(frames, "sheet.png", columns=3, padding=2)
    reloaded = json.loads(json.dumps(document))
    assert (
        reloaded["meta"]["size"] == {"w": atlas.width, "h": atlas.height} and reloaded["meta"]["image"] == "sheet.png"
    )
    pixels = np.asarray(atlas)
    for name, image in frames:
        frame = reloaded["frames"][name]["frame"]
        crop = pixels[frame["y"] : frame["y"] + frame["h"], frame["x"] : frame["x"] + frame["w"]]
        assert np.array_equal(crop, np.asarray(image))
        assert reloaded["frames"][name]["sourceSize"] == {"w": image.width, "h": image.height}


def test_formats_round_trip_with_their_metadata() -> None:
    figure = _figure()
    png = Image.open(io.BytesIO(encode_image(figure, "png", "a knight\nSeed: 1")))
    assert png.mode == "RGBA" and np.array_equal(np.asarray(png), np.asarray(figure))
    assert read_parameters(png) == "a knight\nSeed: 1"
    webp = Image.open(io.BytesIO(encode_image(figure, "webp", "w", lossless=True)))
    assert np.array_equal(np.asarray(webp.convert("RGBA")), np.asarray(figure)) and read_parameters(webp) == "w"
    jpeg = Image.open(io.BytesIO(encode_image(figure, "jpeg", "j", quality=90, matte=(0, 128, 255))))
    assert jpeg.mode == "RGB" and read_parameters(jpeg) == "j"
    assert np.abs(np.asarray(jpeg)[2, 2].astype(int) - (0, 128, 255)).max() < 12  # flattened onto the matte
