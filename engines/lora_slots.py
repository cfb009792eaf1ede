"""LoRAs in a compiled UNet without recompiling: the UNet carries `slots` LoRA adapters of one rank on its
attention projections from the start (zero weights, so they change nothing) and is compiled with them. A
request's LoRA files are swapped into the slots in place (peft's hotswap: weights copied into the same
tensors, lower ranks zero-padded) and its weights become the slots' scales, written into the same scale
tensors; a slot a request does not use gets scale 0. No graph or CUDA graph sees a new module or a moved
tensor, so LoRA sets and weights change freely while serving.

A LoRA that cannot be swapped in (more than `slots` in a request, a rank above the slots', layers beyond the
attention projections, text-encoder parts) is reported by `takes`; the engine then runs it uncompiled.
"""

from __future__ import annotations

import os
import re
from typing import Any

from forge.engine import LoraWeight

# What SDXL LoRAs made for characters and styles adapt most: the attention projections.
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class LoraSlots:
    def __init__(self, pipe: Any, slots: int, rank: int) -> None:
        from peft import LoraConfig
        from peft.tuners.lora import LoraLayer
        from peft.utils.hotswap import prepare_model_for_compiled_hotswap

        self._pipe = pipe
        self.rank = rank
        self.names = [f"slot{index}" for index in range(slots)]
        unet = pipe.unet
        for name in self.names:
            unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(TARGETS)), adapter_name=name)
        unet.set_adapter(self.names)
        prepare_model_for_compiled_hotswap(unet, target_rank=rank)  # scales become tensors, written in place
        self._layers = [module for module in unet.modules() if isinstance(module, LoraLayer)]
        self._held: list[tuple[str, float] | None] = [None] * slots  # the (file, mtime) each slot holds
        self._scales: list[dict[int, float]] = [{} for _ in self.names]  # each slot's file's scale per layer
        self._verdicts: dict[tuple[str, float], str | None] = {}
        self._applied: list[float] | None = None
        self.activate([])

    def takes(self, loras: list[LoraWeight]) -> str | None:
        """None when the slots can serve `loras`, else why not."""
        if len(loras) > len(self.names):
            return f"{len(loras)} LoRAs, more than the compiled engine's {len(self.names)} slots"
        for lora in loras:
            source = (lora.path, os.stat(lora.path).st_mtime)
            if source not in self._verdicts:
                self._verdicts[source] = self._check(lora.path)
            if self._verdicts[source]:
                return f"{lora.name}: {self._verdicts[source]}"
        return None

    def activate(self, loras: list[LoraWeight]) -> None:
        """Make exactly `loras`, at their weights, apply to the next run (none: every slot at scale 0)."""
        for index, lora in enumerate(loras):
            source = (lora.path, os.stat(lora.path).st_mtime)
            if self._held[index] != source:
                self._swap(index, lora.path)
                self._held[index] = source
        weights = [lora.weight for lora in loras] + [0.0] * (len(self.names) - len(loras))
        if weights == self._applied:
            return
        self._pipe.unet.set_adapter(self.names)
        for layer in self._layers:
            for index, name in enumerate(self.names):
                if name in layer.scaling:
                    layer.scaling[name].fill_(self._scales[index].get(id(layer), 0.0) * weights[index])
        self._applied = weights

    def displaced(self) -> None:
        """Adapters of their own were made active instead: the next `activate` makes the slots active again."""
        self._applied = None

    def _swap(self, index: int, path: str) -> None:
        name = self.names[index]
        state_dict, alphas = self._pipe.lora_state_dict(path)  # UNet keys only: `takes` refused the others
        self._pipe.unet.load_lora_adapter(
            state_dict, network_alphas=alphas, adapter_name=name, hotswap=True, prefix="unet"
        )
        self._scales[index] = {id(layer): float(layer.scaling[name]) for layer in self._layers if name in layer.scaling}
        self._applied = None

    def _check(self, path: str) -> str | None:
        state_dict, _ = self._pipe.lora_state_dict(path)
        if any(not key.startswith("unet.") for key in state_dict):
            return "it has text-encoder parts, which cannot be swapped into a compiled engine"
        ranks = [value.shape[1] for key, value in state_dict.items() if "lora_B" in key or "lora.up" in key]
        if ranks and max(ranks) > self.rank:
            return f"rank {max(ranks)} is above the compiled engine's lora_rank {self.rank}"
        modules = {re.split(r"\.lora[._]", key.removeprefix("unet."))[0] for key in state_dict}
        outside = sorted(module for module in modules if not module.endswith(tuple(f".{t}" for t in TARGETS)))
        if outside:
            return f"it adapts {', '.join(outside[:2])}, beyond the attention projections the slots cover"
        return None
