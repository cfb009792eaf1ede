"""Control images for the SDXL ControlNets: edges (OpenCV Canny), depth (given, or estimated with a
transformers depth model) and pose (given, or a built-in template)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from engines.poses import render_pose
from forge.engine import ControlJob

CANNY_LOW = 100
CANNY_HIGH = 200


def canny_edges(image: Image.Image, low: int = CANNY_LOW, high: int = CANNY_HIGH) -> Image.Image:
    """White edges on black, three channels, as the canny ControlNets were trained on."""
    import cv2

    gray = np.asarray(image.convert("L"))
    edges = cv2.Canny(gray, low, high)
    return Image.fromarray(np.stack([edges] * 3, axis=-1))


class DepthEstimator:
    """A transformers depth-estimation model (DPT, Depth Anything, ...) from a folder or a cached repo."""

    def __init__(self, source: str, device: str) -> None:
        from transformers import AutoImageProcessor, AutoModelForDepthEstimation

        self.device = device
        self.processor: Any = AutoImageProcessor.from_pretrained(source)
        self.model: Any = AutoModelForDepthEstimation.from_pretrained(source).to(device).eval()

    def __call__(self, image: Image.Image) -> Image.Image:
        import torch

        inputs = self.processor(images=image.convert("RGB"), return_tensors="pt").to(self.device)
        with torch.inference_mode():
            depth = self.model(**inputs).predicted_depth[0].float().cpu().numpy()
        span = float(depth.max() - depth.min())
        normalised = (depth - depth.min()) / span if span > 0 else np.zeros_like(depth)
        gray = Image.fromarray((normalised * 255).round().astype(np.uint8)).resize(image.size, Image.Resampling.BICUBIC)
        return gray.convert("RGB")


class ControlUnavailable(Exception):
    """The control needs something this server does not have (a depth model, a pose detector)."""


def prepare_control(control: ControlJob, width: int, height: int, depth: DepthEstimator | None) -> Image.Image:
    """The image the ControlNet sees, at the output size."""
    if control.image is None:
        if control.pose is None:
            raise ControlUnavailable(f"{control.type} control needs an image")
        return render_pose(control.pose, width, height)
    with Image.open(Path(control.image)) as source:
        image = source.convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
    if control.type == "canny" and control.preprocess:
        return canny_edges(image)
    if control.type == "depth" and control.preprocess:
        if depth is None:
            raise ControlUnavailable("depth estimation needs a depth model; give a depth map instead")
        return depth(image)
    return image
