"""Fetching from the Hugging Face hub at start: never longer than a bound, never when the hub is off."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterable


def hub_offline() -> bool:
    """HF_HUB_OFFLINE is set: nothing is asked of the hub."""
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}


def fetch_bounded(fetches: Iterable[tuple[str, Callable[[], None]]], timeout_s: float) -> None:
    """Each (name, fetch) in a thread of its own, waited for at most `timeout_s`: an unreachable hub costs that
    much, and a large download goes on in the background. A failure is not raised: the caller reports what is
    still missing afterwards."""

    def quietly(fetch: Callable[[], None]) -> None:
        with contextlib.suppress(Exception):
            fetch()

    for name, fetch in fetches:
        thread = threading.Thread(target=quietly, args=(fetch,), daemon=True, name=f"fetch-{name}")
        thread.start()
        thread.join(timeout_s)
