"""Ids of tasks, uploads and sprite sheets: 32 lowercase hex digits, random or derived from content."""

from __future__ import annotations

import re
import uuid

TASK_ID_PATTERN = r"^[0-9a-f]{32}$"
TASK_ID = re.compile(TASK_ID_PATTERN)


def new_id(hex_digits: str | None = None) -> str:
    """A fresh id, or the one made from `hex_digits` (content-derived ids: uploads, sprite sheets)."""
    return hex_digits or uuid.uuid4().hex
