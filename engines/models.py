"""Decide which SDXL model to load: a local folder, a hub repo id, or `auto` (SDXL base, else tiny)."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from engines.tiny import TINY_MODEL_NAME, build_tiny_sdxl, is_tiny_model
from forge.engine import ModelInfo

log = logging.getLogger(__name__)

SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
# Only what the pipeline loads, in half precision: about 7 GB instead of the repository's 70.
SDXL_FILES = ["model_index.json", "*/*.json", "*/*.txt", "*/*.fp16.safetensors"]


def sdxl_info(name: str, path: str, variant: str | None = None) -> ModelInfo:
    return ModelInfo(
        name=name,
        path=path,
        is_tiny=False,
        default_size=1024,
        default_steps=30,
        default_guidance=5.0,
        min_size=256,
        max_size=2048,
        variant=variant,
    )


def tiny_info(path: Path) -> ModelInfo:
    return ModelInfo(
        name=TINY_MODEL_NAME,
        path=str(path),
        is_tiny=True,
        default_size=64,
        default_steps=4,
        default_guidance=5.0,
        min_size=64,
        max_size=512,
    )


def _cached_sdxl() -> str | None:
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(SDXL_BASE, allow_patterns=SDXL_FILES, local_files_only=True))
    except Exception:  # any cache miss: huggingface_hub raises several types for it
        return None
    return str(folder) if (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").exists() else None


def _hub_reachable(timeout_s: float) -> bool:
    """Ask the hub about SDXL base, giving up after `timeout_s` whatever the resolver or network does."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}:
        return False
    outcome: list[bool] = []

    def probe() -> None:
        from huggingface_hub import HfApi

        try:
            HfApi().model_info(SDXL_BASE, timeout=timeout_s)
            outcome.append(True)
        except Exception:
            outcome.append(False)

    thread = threading.Thread(target=probe, name="hub-probe", daemon=True)
    thread.start()
    thread.join(timeout_s)
    return bool(outcome and outcome[0])


def resolve_model(model: str, data_dir: Path, hub_timeout_s: float) -> ModelInfo:
    """Map the configured `model` to something `from_pretrained` can load."""
    tiny_dir = data_dir / "models" / "tiny-sdxl"
    if model == "tiny":
        return tiny_info(build_tiny_sdxl(tiny_dir))
    if model == "auto":
        cached = _cached_sdxl()
        if cached:
            return sdxl_info(SDXL_BASE, cached, variant="fp16")
        if _hub_reachable(hub_timeout_s):
            from huggingface_hub import snapshot_download

            log.info("downloading %s (about 7 GB) into the Hugging Face cache", SDXL_BASE)
            folder = snapshot_download(SDXL_BASE, allow_patterns=SDXL_FILES)
            return sdxl_info(SDXL_BASE, folder, variant="fp16")
        return tiny_info(build_tiny_sdxl(tiny_dir))
    local = Path(model).expanduser()
    if local.is_dir():
        if is_tiny_model(local):
            return tiny_info(local)
        return sdxl_info(local.name, str(local))
    return sdxl_info(model, model)  # a hub repo id: from_pretrained finds it in the cache or downloads it
