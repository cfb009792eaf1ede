"""Ids that name the server which made them, so that several servers can share one address.

With `node_id` set, a task id is `<node>-<32 hex>` (a sprite sheet's id too); without it, the bare 32 hex
digits, as before. Node ids are lowercase letters, digits and inner hyphens; they never end in a hyphen, so
the split at the hyphen before the last 32 characters is unambiguous.
"""

from __future__ import annotations

import re
import uuid

NODE_ID = r"[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?"
NODE_ID_PATTERN = rf"^{NODE_ID}$"
TASK_ID_PATTERN = rf"^(?:{NODE_ID}-)?[0-9a-f]{{32}}$"
_HEX_LENGTH = 32
TASK_ID = re.compile(TASK_ID_PATTERN)
BARE_TASK_ID = re.compile(r"^[0-9a-f]{32}$")


def new_id(node: str, hex_digits: str | None = None) -> str:
    """A fresh id (or one made from `hex_digits`) that names `node` when there is one."""
    digits = hex_digits or uuid.uuid4().hex
    return f"{node}-{digits}" if node else digits


def node_of(some_id: str) -> str | None:
    """The server an id names, or None for a bare id (or anything that is not an id at all)."""
    if not TASK_ID.match(some_id) or len(some_id) == _HEX_LENGTH:
        return None
    return some_id[: -_HEX_LENGTH - 1]
