"""Background removal with rembg, always from a local ONNX file (rembg would otherwise download one).

One segmentation run is a single onnxruntime call (seconds on a CPU for the 1024² IS-Net models); a
cancelled task ends it through onnxruntime's RunOptions.terminate instead of waiting for it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from PIL import Image

from forge.engine import CancelFlag

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
        self._runs = _RunWithOptions(self.session.inner_session)
        self.session.inner_session = self._runs

    def __call__(self, image: Image.Image, cancel: CancelFlag | None = None) -> Image.Image:
        """RGBA: the character kept, the background transparent (alpha from the model's mask). Raises
        JobCancelled when `cancel` is set before or during the run."""
        import onnxruntime
        from rembg import remove

        cancel = cancel or CancelFlag()
        cancel.raise_if_set()
        options = self._runs.options = onnxruntime.RunOptions()
        options.log_severity_level = 4  # a terminated run is not an error to log; real failures still raise
        try:
            with cancel.interrupting(lambda: setattr(options, "terminate", True)):
                result = remove(image.convert("RGB"), session=self.session, post_process_mask=True)
        except Exception:  # onnxruntime's Fail, "Exiting due to terminate flag being set to true"
            cancel.raise_if_set()
            raise
        assert isinstance(result, Image.Image)
        return result.convert("RGBA")


class _RunWithOptions:
    """Stands in for rembg's onnxruntime session, whose `run(None, feeds)` calls it makes, adding the
    RunOptions of the current removal."""

    def __init__(self, session: Any) -> None:
        self._session = session
        self.options: Any = None

    def run(self, output_names: Any, feeds: Any, run_options: Any = None) -> Any:
        return self._session.run(output_names, feeds, run_options or self.options)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)
