"""Seamless tiles: circular padding in the convolutions of a pipeline's UNet and VAE, for one job.

A tiled image wraps around: its right edge continues into its left (`x`), its bottom into its top (`y`), or
both. Every padded Conv2d of the modules given pads circularly along the tiled axes (and with zeros, as it
always does, along the other) while the job runs, as A1111's `tiling` does (it sets padding_mode="circular"
on every Conv2d of the model). Both axes are exactly that padding mode; one axis pads the input by hand,
circularly on its axis and with zeros on the other, and convolves without padding.

The change is per layer instance, on the job's own modules, and undone when the block ends: engines are
shared across jobs, so a tiled job never leaves a layer tiled, and a job without tiling touches nothing (its
images are bit-identical to those of an engine that never tiled).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# request value -> (wraps left to right, wraps top to bottom)
AXES: dict[str, tuple[bool, bool]] = {
    "none": (False, False),
    "x": (True, False),
    "y": (False, True),
    "both": (True, True),
}
_UNSET = object()
_ConvForward = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def padded_convs(modules: Iterable[Any]) -> list[nn.Conv2d]:
    """Every Conv2d in `modules` (and their children) that zero-pads its input, each once."""
    found: dict[int, nn.Conv2d] = {}
    for module in modules:
        if not isinstance(module, nn.Module):
            continue
        for layer in module.modules():
            if (
                isinstance(layer, nn.Conv2d)
                and layer.padding_mode == "zeros"
                and isinstance(layer.padding, tuple)
                and any(layer.padding)
            ):
                found.setdefault(id(layer), layer)
    return list(found.values())


def _wrapping_forward(conv: nn.Conv2d, wrap_x: bool, wrap_y: bool) -> _ConvForward:
    """`conv`'s convolution with its padding done by hand: circular along the wrapped axes, zeros elsewhere."""
    pad_h, pad_w = (int(side) for side in conv.padding)  # padded_convs keeps only integer paddings

    def forward(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if wrap_x and wrap_y:  # padding_mode="circular"
            input = F.pad(input, (pad_w, pad_w, pad_h, pad_h), mode="circular")
        else:
            if pad_w:
                input = F.pad(input, (pad_w, pad_w, 0, 0), mode="circular" if wrap_x else "constant")
            if pad_h:
                input = F.pad(input, (0, 0, pad_h, pad_h), mode="circular" if wrap_y else "constant")
        return F.conv2d(input, weight, bias, conv.stride, 0, conv.dilation, conv.groups)

    return forward


@contextmanager
def tiled(modules: Iterable[Any], tiling: str) -> Iterator[None]:
    """Within the block, the padded convolutions of `modules` wrap around along `tiling`'s axes ("none": no
    change at all). Afterwards each layer is exactly as it was, also when the block raises."""
    wrap_x, wrap_y = AXES[tiling]
    if not (wrap_x or wrap_y):
        yield
        return
    convs = padded_convs(modules)
    saved = [(conv, vars(conv).get("_conv_forward", _UNSET)) for conv in convs]
    try:
        for conv in convs:
            # An instance attribute shadows Conv2d._conv_forward, which Conv2d.forward calls.
            vars(conv)["_conv_forward"] = _wrapping_forward(conv, wrap_x, wrap_y)
        yield
    finally:
        for conv, previous in saved:
            if previous is _UNSET:
                vars(conv).pop("_conv_forward", None)
            else:
                vars(conv)["_conv_forward"] = previous


def is_tiled(modules: Iterable[Any]) -> bool:
    """Whether any padded convolution of `modules` is patched now (for checks that a job left none)."""
    return any("_conv_forward" in vars(conv) for conv in padded_convs(modules))
