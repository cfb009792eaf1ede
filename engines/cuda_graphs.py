"""CUDA graphs for the UNet: each input signature (shapes, dtypes and the non-tensor arguments) is recorded
once and then replayed, so a denoising step launches one graph instead of the thousand-odd kernels, and the
Python between them, that left the GPU idle at batch 1 (an SDXL UNet call at 1024² took the same time for 2
rows as for 4 on an H200). Inputs are copied into the graph's own tensors and outputs copied out.

Signatures stay few because the UNet's rows are padded to a few counts (engines.compiled.RowPadding), and the
weights a graph reads never move: a LoRA switched with set_adapters (new scales as Python numbers) runs with
graphs off (see engines.compiled.uncompiled). A signature whose recording fails runs as before, with a warning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

log = logging.getLogger(__name__)


@dataclass
class _Recorded:
    graph: torch.cuda.CUDAGraph
    inputs: list[Any]  # the graph's input tensors (and the non-tensor arguments, as given)
    output: Any


class CudaGraphs:
    def __init__(self, module: torch.nn.Module) -> None:
        self.enabled = True
        self._forward = module.forward
        self._recorded: dict[Any, _Recorded] = {}
        self._failed: set[Any] = set()
        self._pool = torch.cuda.graph_pool_handle()
        module.forward = self  # type: ignore[method-assign]  # hooks and callers still go through the module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.enabled or torch.is_grad_enabled():
            return self._forward(*args, **kwargs)
        leaves, spec = tree_flatten((args, kwargs))
        key = (str(spec), *(_signature(leaf) for leaf in leaves))
        recorded = self._recorded.get(key)
        if recorded is None:
            if key in self._failed:
                return self._forward(*args, **kwargs)
            try:
                recorded = self._record(leaves, spec)
            except Exception as exc:  # e.g. a kernel that synchronises: this signature runs as before
                log.warning("CUDA graph not recorded (%s: %s); running without one", type(exc).__name__, exc)
                self._failed.add(key)
                return self._forward(*args, **kwargs)
            self._recorded[key] = recorded
        for target, value in zip(recorded.inputs, leaves, strict=True):
            if isinstance(target, torch.Tensor):
                target.copy_(value)
        recorded.graph.replay()
        return _copy(recorded.output)

    def _record(self, leaves: list[Any], spec: Any) -> _Recorded:
        inputs = [leaf.clone() if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
        args, kwargs = tree_unflatten(inputs, spec)
        device = next(leaf.device for leaf in inputs if isinstance(leaf, torch.Tensor))
        side = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # compiles, autotunes and allocates workspaces before recording
            for _ in range(2):
                self._forward(*args, **kwargs)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: another thread's GPU work (post-processing) during the recording is not an error.
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            output = self._forward(*args, **kwargs)
        return _Recorded(graph, inputs, output)


def _signature(leaf: Any) -> Any:
    if isinstance(leaf, torch.Tensor):
        return (tuple(leaf.shape), leaf.dtype, leaf.device, leaf.is_contiguous())
    return leaf if isinstance(leaf, int | float | str | bool | None) else repr(leaf)


def _copy(output: Any) -> Any:
    """The output, in tensors of its own: the next replay overwrites the graph's."""
    if isinstance(output, tuple):
        return tuple(item.clone() if isinstance(item, torch.Tensor) else item for item in output)
    return type(output)(sample=output.sample.clone())
