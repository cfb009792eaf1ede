"""One classifier-free guidance scale per batch row, so requests with different scales share a UNet pass.

CFG is element-wise: `uncond + s * (text - uncond)`. diffusers' SDXL pipeline takes one scale for the
batch and reads it back through its `guidance_scale` property in that one expression; the pipeline here
answers with each row's own scale instead. Each row is computed exactly as it would be alone: PyTorch
multiplies a tensor by a Python scale in float32 and rounds to the tensor's dtype, and so does RowScales.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import StableDiffusionXLPipeline


class RowScales:
    """Guidance scales for the rows of a batch, multiplying like the scalar each row would get alone."""

    def __init__(self, scales: list[float]) -> None:
        self.scales = torch.tensor(scales, dtype=torch.float32).view(-1, 1, 1, 1)

    def __mul__(self, other: torch.Tensor) -> torch.Tensor:
        return (self.scales.to(other.device) * other.float()).to(other.dtype)

    __rmul__ = __mul__


class RowGuidedSDXLPipeline(StableDiffusionXLPipeline):  # type: ignore[misc]  # diffusers has no type hints
    """SDXL's pipeline with `row_scales` set: each row guided by its own scale. The `guidance_scale`
    argument (any of the scales) still decides whether there is guidance at all, so every row's scale must
    be on the same side of 1."""

    row_scales: RowScales | None = None

    @property
    def guidance_scale(self) -> Any:
        return self.row_scales if self.row_scales is not None else self._guidance_scale


def guides_only_by_cfg(pipe: Any) -> bool:
    """Whether this model's UNet takes guidance only through CFG, so rows may have scales of their own.
    Guidance-distilled UNets (LCM) embed one scale for the whole batch as a UNet input instead, and run no
    unconditional half."""
    return pipe.unet.config.time_cond_proj_dim is None
