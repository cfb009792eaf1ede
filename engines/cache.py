"""The models loaded on one device: loaded on demand, warmed, least recently used unloaded first when the
memory budget would be exceeded. The pinned (default) model is never unloaded to make room.

Synchronous like every backend: the engine actor calls it on the device's thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from engines.weights import weight_files
from forge.engine import Engine, ModelInfo

Loader = Callable[[ModelInfo], Engine]
LoadedFn = Callable[[str, float], None]
"""Told each model that finished loading and warming, with the seconds it took."""


def estimate_bytes(model: ModelInfo) -> int:
    """What loading will take, from the weight files (halved where fp32 files are loaded as fp16 is not known
    here, so this errs high); hub ids not on disk count as 0 and are measured after loading."""
    path = Path(model.path)
    if not path.exists():
        return 0
    files = weight_files(path)
    if model.variant:
        files = [f for f in files if f".{model.variant}." in f.name] or files
    return sum(f.stat().st_size for f in files)


def release_memory(device: str) -> None:
    """Give freed memory back: Python's garbage, the CUDA cache, and glibc's free lists on the CPU."""
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()
    else:
        with contextlib.suppress(OSError, AttributeError):  # not glibc
            ctypes.CDLL("libc.so.6").malloc_trim(0)


class ModelCache:
    def __init__(
        self, device: str, budget_bytes: int, pinned: str, load: Loader, on_loaded: LoadedFn | None = None
    ) -> None:
        self.device = device
        self.budget_bytes = budget_bytes
        self.pinned = pinned
        self._load = load
        self._on_loaded = on_loaded
        self._engines: OrderedDict[str, Engine] = OrderedDict()
        self._sizes: dict[str, int] = {}
        self._lock = threading.Lock()  # `loaded()` is read from the event loop while the device thread works

    def get(self, model: ModelInfo) -> Engine:
        """The loaded engine for `model`, loading (and warming) it first if needed."""
        engine = self._engines.get(model.id)
        if engine is not None:
            with self._lock:
                self._engines.move_to_end(model.id)
            return engine
        self._make_room(estimate_bytes(model), keep=model.id)
        started = time.perf_counter()
        engine = self._load(model)
        try:
            engine.warm()
        except BaseException:
            engine.close()
            release_memory(self.device)
            raise
        if self._on_loaded is not None:
            self._on_loaded(model.id, time.perf_counter() - started)
        size = engine.memory_bytes()
        with self._lock:
            self._engines[model.id] = engine
            self._sizes[model.id] = size
        self._make_room(0, keep=model.id)  # the estimate may have been low
        return engine

    def remeasure(self, model_id: str) -> None:
        """After a model took on LoRAs or ControlNets: count them, and make room if they pushed it over."""
        engine = self._engines.get(model_id)
        if engine is None:
            return
        size = engine.memory_bytes()
        with self._lock:
            self._sizes[model_id] = size
        self._make_room(0, keep=model_id)

    def unload(self, model_id: str) -> bool:
        with self._lock:
            engine = self._engines.pop(model_id, None)
            if engine is None:
                return False
            del self._sizes[model_id]
        engine.close()
        del engine
        release_memory(self.device)
        return True

    def loaded(self) -> dict[str, int]:
        """Model id -> bytes it holds on this device, least recently used first."""
        with self._lock:
            return {model_id: self._sizes[model_id] for model_id in self._engines}

    def close(self) -> None:
        """Drop every model at shutdown. No forced garbage collection: in a large process a full one takes
        about a second, and the memory is given back by the process exiting or the collector's next run."""
        with self._lock:
            engines = list(self._engines.values())
            self._engines.clear()
            self._sizes.clear()
        for engine in engines:
            engine.close()

    def _make_room(self, needed: int, *, keep: str) -> None:
        for model_id in list(self._engines):
            if sum(self._sizes.values()) + needed <= self.budget_bytes:
                return
            if model_id not in (self.pinned, keep):
                self.unload(model_id)
