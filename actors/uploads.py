"""Uploaded control images: checked by decoding them, stored once as PNG under a content-derived id, in the
store's files (a directory, or Redis for a fleet). Blocking: call off the event loop."""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from actors.files import Files
from forge.errors import InvalidRequest, PayloadTooLarge
from forge.ids import new_id

UPLOAD_PREFIX = "up_"
UPLOAD_ID = re.compile(rf"^{UPLOAD_PREFIX}[0-9a-f]{{32}}$")
MAX_SIDE = 4096
_DATA_URL = re.compile(r"^data:image/[a-z.+-]+;base64,", re.IGNORECASE)


class UploadStore:
    def __init__(self, files: Files, max_bytes: int) -> None:
        self.files = files
        self.max_bytes = max_bytes

    def path(self, upload_id: str) -> Path | None:
        """The upload as a file on this machine (fetched from the store if need be), or None if unknown."""
        return self.files.local_path(f"{upload_id}.png") if UPLOAD_ID.match(upload_id) else None

    def size(self, upload_id: str) -> tuple[int, int] | None:
        path = self.path(upload_id)
        if path is None:
            return None
        with Image.open(path) as image:
            return image.size

    def save(self, data: bytes, *, field: str = "body") -> tuple[str, int, int]:
        """Store an image (PNG, JPEG, WebP, ...); returns (id, width, height). Blocking: call off the loop."""
        if len(data) > self.max_bytes:
            raise PayloadTooLarge(f"images may be at most {self.max_bytes} bytes", field=field, rule="max_bytes")
        try:
            with Image.open(io.BytesIO(data)) as image:
                if max(image.size) > MAX_SIDE:
                    raise InvalidRequest(f"images may be at most {MAX_SIDE} pixels a side", field=field, rule="range")
                image.load()
                rgb = image.convert("RGB")
        except UnidentifiedImageError:
            raise InvalidRequest(
                "not an image this server can read (PNG, JPEG, WebP, GIF, BMP or TIFF)", field=field, rule="image"
            ) from None
        except Image.DecompressionBombError:
            raise InvalidRequest("the image has too many pixels to decode safely", field=field, rule="image") from None
        except (OSError, ValueError) as exc:  # a known format, but damaged or truncated
            reason = str(exc).split(" <")[0] or type(exc).__name__
            raise InvalidRequest(f"the image is damaged or truncated ({reason})", field=field, rule="image") from None
        upload_id = UPLOAD_PREFIX + new_id(hashlib.sha256(data).hexdigest()[:32])
        buffer = io.BytesIO()
        rgb.save(buffer, format="PNG")
        self.files.write(f"{upload_id}.png", buffer.getvalue())
        return upload_id, rgb.width, rgb.height

    def save_inline(self, text: str, *, field: str) -> str:
        """A control image given in the request itself (base64, optionally a data: URL) becomes an upload."""
        if UPLOAD_ID.match(text):
            if self.path(text) is None:
                raise InvalidRequest(f"no upload with id {text!r}", field=field, rule="unknown_upload")
            return text
        if len(text) > self.max_bytes * 4 // 3 + 4:
            raise PayloadTooLarge(f"images may be at most {self.max_bytes} bytes", field=field, rule="max_bytes")
        return self.save(decode_inline(text, field=field), field=field)[0]


def decode_inline(text: str, *, field: str) -> bytes:
    """An image sent as base64 (a data: URL is fine), as bytes."""
    try:
        return base64.b64decode(_DATA_URL.sub("", text.strip()), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(
            f"expected an upload id ({UPLOAD_PREFIX}...) or a base64-encoded image", field=field, rule="image"
        ) from None
