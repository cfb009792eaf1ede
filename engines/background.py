"""Background removal with rembg, always from a local ONNX file (rembg would otherwise download one)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from PIL import Image

# Which rembg session runs each known model: U^2-Net models and the IS-Net (DIS) family differ in input
# size and normalisation. isnet-anime is made for anime-style characters.
SESSION_KINDS = {
    "u2net": "u2net_custom",
    "u2netp": "u2net_custom",
    "u2net_human_seg": "u2net_custom",
    "silueta": "u2net_custom",
    "isnet-general-use": "dis_custom",
    "isnet-anime": "dis_custom",
}
MODEL_SUFFIX = ".onnx"


class BackgroundError(Exception):
    pass


class BackgroundRemover:
    def __init__(self, name: str, path: Path, device: str) -> None:
        from rembg import new_session

        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.startswith("cuda") else None
        # rembg accepts a model file only from inside its home folder, which it reads from U2NET_HOME when
        # the session is made; sessions are made on the post-processor's one thread.
        previous = os.environ.get("U2NET_HOME")
        os.environ["U2NET_HOME"] = str(path.parent)
        try:
            self.session: Any = new_session(
                SESSION_KINDS.get(name, "u2net_custom"), model_path=str(path), providers=providers
            )
        except Exception as exc:  # onnxruntime raises its own types for damaged files
            raise BackgroundError(f"{path} is not a loadable segmentation model: {exc}") from exc
        finally:
            if previous is None:
                os.environ.pop("U2NET_HOME", None)
            else:
                os.environ["U2NET_HOME"] = previous

    def __call__(self, image: Image.Image) -> Image.Image:
        """RGBA: the character kept, the background transparent (alpha from the model's mask)."""
        from rembg import remove

        result = remove(image.convert("RGB"), session=self.session, post_process_mask=True)
        assert isinstance(result, Image.Image)
        return result.convert("RGBA")
