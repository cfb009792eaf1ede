"""Counts torch.compile's compiles per engine: each graph dynamo traces (a cache hit on disk still traces) is
one compile; those after an engine finished warming up are recompiles, which stall requests while serving.

Dynamo reports compiles process-wide, on the thread that compiles. Each engine runs on its device's thread,
so the engine that is running on the compiling thread is the one charged.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any


@dataclass
class CompileCounts:
    compiles: int = 0  # all graphs compiled, warm-up included
    recompiles: int = 0  # graphs compiled after warm-up
    warmed: bool = False

    def count_compile(self) -> None:
        self.compiles += 1
        if self.warmed:
            self.recompiles += 1


_running = threading.local()
_install_lock = threading.Lock()
_engines: dict[tuple[str, str], CompileCounts] = {}  # (device, model id) -> its counts, for /metrics


def counts_for(device: str, model_id: str) -> CompileCounts:
    """A compiled engine's counts, kept for the metrics until the process ends (a model loaded again on the
    same device goes on counting)."""
    return _engines.setdefault((device, model_id), CompileCounts())


def every_engine() -> list[tuple[str, str, CompileCounts]]:
    return [(device, model, counts) for (device, model), counts in list(_engines.items())]


def _on_compile_end(args: Any) -> None:
    from torch._dynamo.callback import CallbackTrigger

    counts: CompileCounts | None = getattr(_running, "counts", None)
    if counts is None or args.callback_trigger != CallbackTrigger.DYNAMO:
        return
    counts.count_compile()


def _install() -> None:
    from torch._dynamo.callback import callback_handler

    with _install_lock:  # again after torch._dynamo.reset(), which drops every callback
        if _on_compile_end not in callback_handler.end_callbacks:
            callback_handler.register_end_callback(_on_compile_end)


@contextmanager
def charged_to(counts: CompileCounts) -> Iterator[None]:
    """Compiles on this thread while the block runs count for `counts`."""
    _install()
    previous = getattr(_running, "counts", None)
    _running.counts = counts
    try:
        yield
    finally:
        _running.counts = previous
