"""Fetching from the Hugging Face hub at start: never longer than a bound, never when the hub is off."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterable


def hub_offline() -> bool:
    """HF_HUB_OFFLINE is set: nothing is asked of the hub."""
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}


def fetch_bounded(fetches: Iterable[tuple[str, Callable[[], None]]], timeout_s: float) -> None:
    """Each (name, fetch) in a thread of its own, all of them waited for at most `timeout_s` together: an
    unreachable hub costs that much however many fetches there are, and a large download goes on in the
    background. A failure is not raised: the caller reports what is still missing afterwards."""

    def quietly(fetch: Callable[[], None]) -> None:
        with contextlib.suppress(Exception):
            fetch()

    threads = [
        threading.Thread(target=quietly, args=(fetch,), daemon=True, name=f"fetch-{name}") for name, fetch in fetches
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout_s
    for thread in threads:
        thread.join(max(deadline - time.monotonic(), 0))
