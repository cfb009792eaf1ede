"""Uploaded control images: checked by decoding them, stored once as PNG under a content-derived id."""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import re
import tempfile
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from forge.errors import InvalidRequest, PayloadTooLarge
from forge.nodes import NODE_ID, new_id

UPLOAD_PREFIX = "up_"
UPLOAD_ID = re.compile(rf"^{UPLOAD_PREFIX}(?:{NODE_ID}-)?[0-9a-f]{{32}}$")  # names its server, as task ids do
MAX_SIDE = 4096
_DATA_URL = re.compile(r"^data:image/[a-z.+-]+;base64,", re.IGNORECASE)


class UploadStore:
    def __init__(self, directory: Path, max_bytes: int, node_id: str = "") -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.node_id = node_id

    def path(self, upload_id: str) -> Path | None:
        if not UPLOAD_ID.match(upload_id):
            return None
        path = self.directory / f"{upload_id}.png"
        return path if path.is_file() else None

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
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError, ValueError) as exc:
            raise InvalidRequest(f"not a readable image: {exc}", field=field, rule="image") from None
        upload_id = UPLOAD_PREFIX + new_id(self.node_id, hashlib.sha256(data).hexdigest()[:32])
        target = self.directory / f"{upload_id}.png"
        if not target.exists():
            self.directory.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.directory, suffix=".partial", delete=False) as tmp:
                rgb.save(tmp, format="PNG")
            os.replace(tmp.name, target)
        return upload_id, rgb.width, rgb.height

    def save_inline(self, text: str, *, field: str) -> str:
        """A control image given in the request itself (base64, optionally a data: URL) becomes an upload."""
        if UPLOAD_ID.match(text):
            if self.path(text) is None:
                raise InvalidRequest(f"no upload with id {text!r}", field=field, rule="unknown_upload")
            return text
        if len(text) > self.max_bytes * 4 // 3 + 4:
            raise PayloadTooLarge(f"images may be at most {self.max_bytes} bytes", field=field, rule="max_bytes")
        try:
            data = base64.b64decode(_DATA_URL.sub("", text.strip()), validate=True)
        except (binascii.Error, ValueError):
            raise InvalidRequest(
                f"expected an upload id ({UPLOAD_PREFIX}...) or a base64-encoded image", field=field, rule="image"
            ) from None
        return self.save(data, field=field)[0]
