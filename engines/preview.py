"""Cheap previews straight from SDXL latents: a linear map from the 4 latent channels to RGB."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

# Least-squares fit of SDXL latents to RGB, as used by ComfyUI's and A1111's "approx cheap" previews.
_SDXL_LATENT_RGB = np.array(
    [
        [0.3651, 0.4232, 0.4341],
        [-0.2533, -0.0042, 0.1068],
        [0.1076, 0.1111, -0.0362],
        [-0.3165, -0.2492, -0.2188],
    ],
    dtype=np.float32,
)
_SDXL_LATENT_RGB_BIAS = np.array([0.1084, -0.0175, -0.0011], dtype=np.float32)


def latent_preview(latents: torch.Tensor, max_side: int) -> Image.Image:
    """Preview of the first latent in a batch, scaled so its longer side is at most `max_side`."""
    first = latents[0].detach().float().cpu().numpy()  # (4, h, w)
    rgb = np.einsum("chw,cr->hwr", first, _SDXL_LATENT_RGB) + _SDXL_LATENT_RGB_BIAS
    pixels = ((rgb.clip(-1, 1) + 1) * 127.5).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BILINEAR)
