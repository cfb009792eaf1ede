"""LoRAs on one pipeline: each file is loaded once as a named adapter, then requests switch between sets
with `set_adapters` (weights only). Loading and unloading per request grows memory; this does not.
"""

from __future__ import annotations

import os
import re
import warnings
from collections import OrderedDict
from typing import Any

from forge.engine import LoraWeight

MAX_RESIDENT = 16
# peft warns whenever a second adapter joins a model; keeping several resident is the point here.
warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute", category=UserWarning)


def adapter_name(lora: LoraWeight) -> str:
    """peft keeps adapters in module dicts: no dots allowed."""
    return re.sub(r"[^A-Za-z0-9_]", "_", lora.name)


class LoraAdapters:
    def __init__(self, pipe: Any, max_resident: int = MAX_RESIDENT) -> None:
        self._pipe = pipe
        self._max_resident = max_resident
        # adapter name -> (path, modification time) it was loaded from; least recently used first.
        self._resident: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._enabled = False

    @property
    def resident(self) -> list[str]:
        return list(self._resident)

    def activate(self, loras: list[LoraWeight]) -> None:
        """Make exactly `loras`, at their weights, apply to the next run (none: the plain base model)."""
        if not loras:
            if self._enabled:
                self._pipe.disable_lora()
                self._enabled = False
            return
        names = [self._ensure_loaded(lora) for lora in loras]
        self._pipe.enable_lora()
        self._enabled = True
        self._pipe.set_adapters(names, adapter_weights=[lora.weight for lora in loras])

    def _ensure_loaded(self, lora: LoraWeight) -> str:
        name = adapter_name(lora)
        source = (lora.path, os.stat(lora.path).st_mtime)
        if self._resident.get(name) == source:
            self._resident.move_to_end(name)
            return name
        if name in self._resident:  # the file changed on disk: reload it
            self._delete(name)
        while len(self._resident) >= self._max_resident:
            self._delete(next(iter(self._resident)))
        self._pipe.load_lora_weights(lora.path, adapter_name=name)
        self._resident[name] = source
        return name

    def _delete(self, name: str) -> None:
        self._pipe.delete_adapters(name)
        del self._resident[name]
