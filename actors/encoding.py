"""Encode generated images (PNG / WebP / JPEG) with their parameters embedded, and write them atomically."""

from __future__ import annotations

import base64
import io
import os
import uuid
from collections.abc import Callable
from pathlib import Path

from PIL import Image, PngImagePlugin

from forge.errors import InvalidRequest

EXTENSIONS = {"png": "png", "webp": "webp", "jpeg": "jpg"}
CONTENT_TYPES = {"png": "image/png", "webp": "image/webp", "jpg": "image/jpeg", "jpeg": "image/jpeg"}
_EXIF_IFD = 0x8769
_USER_COMMENT = 0x9286


def _user_comment(text: str) -> bytes:
    # EXIF UserComment with the UNICODE character code, as A1111 writes it for JPEG and WebP.
    return b"UNICODE\x00" + text.encode("utf-16-be")


def png_base64(image: Image.Image) -> str:
    """The image as a PNG, in base64 (as clients send and take images inline)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def mask_as_ours(data: bytes, convert: Callable[[Image.Image], Image.Image]) -> str:
    """A mask in a client's convention, `convert`ed to ours (white repaints), as base64 PNG; a 422 naming
    `mask` when it is not an image."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return png_base64(convert(image))
    except (OSError, ValueError):
        raise InvalidRequest("the mask is not an image this server can read", field="mask", rule="image") from None


def read_parameters(image: Image.Image) -> str | None:
    """The infotext embedded in an image written by `encode_image` (or by A1111)."""
    if "parameters" in image.info:
        return str(image.info["parameters"])
    comment = image.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT)
    if isinstance(comment, bytes) and comment.startswith(b"UNICODE\x00"):
        return comment[8:].decode("utf-16-be")
    return None


def encode_image(
    image: Image.Image,
    output_format: str,
    parameters: str,
    *,
    quality: int = 95,
    lossless: bool = False,
    matte: tuple[int, int, int] = (255, 255, 255),
) -> bytes:
    """PNG and WebP keep transparency; JPEG has none, so transparent parts are flattened onto `matte`."""
    buffer = io.BytesIO()
    if output_format == "png":
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", parameters)
        image.save(buffer, format="PNG", pnginfo=info)
    else:
        exif = Image.Exif()
        exif.get_ifd(_EXIF_IFD)[_USER_COMMENT] = _user_comment(parameters)
        if output_format == "webp":
            image.save(buffer, format="WEBP", quality=quality, lossless=lossless, exact=lossless, exif=exif)
        else:
            flat = image
            if image.mode == "RGBA":
                flat = Image.new("RGB", image.size, matte)
                flat.paste(image, mask=image.getchannel("A"))
            flat.convert("RGB").save(buffer, format="JPEG", quality=quality, exif=exif)
    return buffer.getvalue()


def write_atomically(path: Path, data: bytes) -> None:
    """Readers see either no file or the whole file, even if the process dies mid-write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
