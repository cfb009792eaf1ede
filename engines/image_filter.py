"""Check generated images with a transformers image classifier (an NSFW detector, say) before they are
stored. Any classifier works; the labels that count as unsafe and the threshold come from config."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from PIL import Image

from engines.loading import LOADING


class ImageFilter:
    def __init__(self, source: str, device: str, unsafe_labels: Iterable[str], threshold: float) -> None:
        from transformers import pipeline

        with LOADING:
            self._classify: Any = pipeline("image-classification", model=source, device=device)
        self._unsafe = {label.strip().casefold() for label in unsafe_labels if label.strip()}
        self._threshold = threshold

    def flagged(self, image: Image.Image) -> tuple[str, float] | None:
        """(label, score) of the first unsafe label at or over the threshold, or None."""
        for result in self._classify(image.convert("RGB"), top_k=None):
            label, score = str(result["label"]), float(result["score"])
            if label.casefold() in self._unsafe and score >= self._threshold:
                return label, score
        return None
