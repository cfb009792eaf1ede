"""Decide which SDXL model to load: a local folder, a hub repo id, or `auto` (SDXL base, else tiny)."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

from engines.tiny import TINY_MODEL_NAME, build_tiny_sdxl, is_tiny_model
from engines.tiny_extras import CONTROL_TYPES, TINY_IP_ADAPTER, TINY_IP_WEIGHT, build_tiny_companions
from forge.config import Config, ModelEntry
from forge.engine import ModelInfo
from forge.errors import ConfigError
from forge.hub_fetch import fetch_bounded, hub_offline
from forge.ip_adapters import IpAdapterSource

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


SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


def tiny_info(path: Path) -> ModelInfo:
    try:
        companions = build_tiny_companions(path)
    except Exception as exc:  # a damaged tiny model: its own load reports the file; serve it without control
        log.warning("no ControlNets for the tiny model at %s: %s", path, exc)
        companions = {}
    return ModelInfo(
        controlnets={kind: str(companions[kind]) for kind in CONTROL_TYPES if kind in companions},
        depth_model=str(companions["depth_model"]) if "depth_model" in companions else None,
        ip_adapters={
            TINY_IP_ADAPTER: IpAdapterSource(
                source=str(companions[TINY_IP_ADAPTER]), weight_name=TINY_IP_WEIGHT, image_encoder="image_encoder"
            )
        }
        if TINY_IP_ADAPTER in companions
        else {},
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
    if hub_offline():
        return False
    answered: list[bool] = []

    def probe() -> None:
        from huggingface_hub import HfApi

        HfApi().model_info(SDXL_BASE, timeout=timeout_s)
        answered.append(True)

    fetch_bounded([("hub-probe", probe)], timeout_s)
    return bool(answered)


def _default_id(info: ModelInfo) -> str:
    if info.is_tiny:
        return "tiny-sdxl"
    if info.name == SDXL_BASE:
        return "sdxl-base"
    return info.name


def with_companions(
    info: ModelInfo,
    *,
    model_id: str,
    controlnets: dict[str, str],
    depth_model: str | None,
    ip_adapters: dict[str, IpAdapterSource],
) -> ModelInfo:
    """Give a model its id and, for SDXL, the configured ControlNets, depth model and IP-Adapters (tiny builds
    its own)."""
    if info.is_tiny:
        return replace(info, id=model_id)
    return replace(info, id=model_id, controlnets=controlnets, depth_model=depth_model, ip_adapters=ip_adapters)


def resolve_extra_model(model_id: str, source: str, default: ModelInfo) -> ModelInfo:
    """An additional model from config: a diffusers folder, a single checkpoint file or a hub repo id."""
    local = Path(source).expanduser()
    if local.suffix in SINGLE_FILE_SUFFIXES:
        if not local.is_file():
            raise ConfigError(f"model {model_id!r}: checkpoint file {local} does not exist", field="models")
        # A single file holds weights only; the default model's folder describes the architecture.
        base = tiny_info(Path(default.path)) if default.is_tiny else sdxl_info(model_id, str(local))
        return replace(base, name=local.name, path=str(local), format="single_file", config=default.path, variant=None)
    if local.is_dir():
        info = tiny_info(local) if is_tiny_model(local) else sdxl_info(local.name, str(local))
        return replace(info, name=local.name if not info.is_tiny else info.name)
    if source.startswith((".", "/", "~")):
        raise ConfigError(f"model {model_id!r}: {source} does not exist", field="models")
    return sdxl_info(source, source)


def resolve_model(model: str, data_dir: Path, hub_timeout_s: float, *, download: bool = True) -> ModelInfo:
    """The default model, with its id. `download` False (an API node, which loads no weights): SDXL base that
    is not cached here is described, not fetched."""
    info = _resolve_default(model, data_dir, hub_timeout_s, download)
    return replace(info, id=_default_id(info))


def _resolve_default(model: str, data_dir: Path, hub_timeout_s: float, download: bool = True) -> ModelInfo:
    """Map the configured `model` to something `from_pretrained` can load."""
    tiny_dir = data_dir / "models" / "tiny-sdxl"
    if model == "tiny":
        return tiny_info(build_tiny_sdxl(tiny_dir))
    if model == "auto":
        cached = _cached_sdxl()
        if cached:
            return sdxl_info(SDXL_BASE, cached, variant="fp16")
        if _hub_reachable(hub_timeout_s):
            if not download:
                return sdxl_info(SDXL_BASE, SDXL_BASE, variant="fp16")
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


# Keys a single-file checkpoint carries to announce its family (ComfyUI comfy/model_detection.py, A1111).
V_PRED_KEY, ZTSNR_KEY = "v_pred", "ztsnr"
ZERO_SNR_GUIDANCE_RESCALE = 0.7  # the rescale Lin et al. recommend with zero terminal SNR


def detected_family(info: ModelInfo) -> tuple[str, bool]:
    """(prediction, zero_snr) as the weights announce them: a single file by its `v_pred` and `ztsnr` keys
    (`ztsnr` counts only with `v_pred`, as ComfyUI reads it), a diffusers folder by its scheduler config.
    A hub repo id or a pickled checkpoint says nothing here: epsilon, unless the configuration says otherwise."""
    path = Path(info.path)
    if info.format == "single_file" and path.suffix == ".safetensors" and path.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as tensors:
                keys = set(tensors.keys())
        except Exception:  # a damaged file: its load reports it
            return "epsilon", False
        v_pred = V_PRED_KEY in keys
        return ("v" if v_pred else "epsilon"), v_pred and ZTSNR_KEY in keys
    scheduler = path / "scheduler" / "scheduler_config.json"
    if info.format == "diffusers" and scheduler.is_file():
        try:
            settings = json.loads(scheduler.read_text())
        except (OSError, ValueError):
            return "epsilon", False
        v_pred = settings.get("prediction_type") == "v_prediction"
        return ("v" if v_pred else "epsilon"), bool(settings.get("rescale_betas_zero_snr"))
    return "epsilon", False


def with_family(info: ModelInfo, entry: ModelEntry, vaes: dict[str, str], model_id: str) -> ModelInfo:
    """The model's prediction, zero SNR, default guidance rescale and VAE: configured, else detected."""
    prediction, zero_snr = detected_family(info)
    prediction = entry.prediction or prediction
    zero_snr = zero_snr if entry.zero_snr is None else entry.zero_snr
    rescale = entry.guidance_rescale
    if rescale is None:
        rescale = ZERO_SNR_GUIDANCE_RESCALE if zero_snr else 0.0
    if entry.vae and entry.vae not in vaes:
        known = ", ".join(vaes) or "none configured"
        raise ConfigError(f"model {model_id!r}: vae {entry.vae!r} is not in vaes ({known})", field="models")
    return replace(
        info, prediction=prediction, zero_snr=zero_snr, guidance_rescale=rescale, vae=entry.vae or None, vaes=vaes
    )


def _entry(value: str | ModelEntry) -> ModelEntry:
    return ModelEntry(source=value) if isinstance(value, str) else value


def resolve_models(config: Config) -> list[ModelInfo]:
    """The default model first, then the configured extra ones, each with its ControlNets and depth model."""
    controlnets = {kind: source for kind in CONTROL_TYPES if (source := getattr(config, f"controlnet_{kind}"))}
    depth = config.depth_model or None
    default = resolve_model(config.model, config.data_path, config.hub_timeout_s, download=config.role != "api")
    adapters = dict(config.ip_adapters)
    vaes = dict(config.vaes)
    entries = {model_id: _entry(value) for model_id, value in config.models.items()}
    default_entry = entries.pop(default.id, ModelEntry())
    if default_entry.source:
        raise ConfigError(
            f"model id {default.id!r} is the default model's id; pick another (an entry without a source sets the "
            "default model's settings)",
            field="models",
        )
    models = [
        with_family(
            with_companions(
                default, model_id=default.id, controlnets=controlnets, depth_model=depth, ip_adapters=adapters
            ),
            default_entry,
            vaes,
            default.id,
        )
    ]
    for model_id, entry in entries.items():
        if not entry.source:
            raise ConfigError(f"model {model_id!r} needs a source", field="models")
        extra = resolve_extra_model(model_id, entry.source, default)
        extra = with_companions(
            extra, model_id=model_id, controlnets=controlnets, depth_model=depth, ip_adapters=adapters
        )
        models.append(with_family(extra, entry, vaes, model_id))
    upscalers = str(config.upscalers_path)
    models = [replace(model, upscalers_dir=upscalers) for model in models]
    known = {model.id for model in models}
    for model_id in config.inpainting_models:
        if model_id not in known:
            raise ConfigError(
                f"inpainting_models names {model_id!r}, which is not a model (known: {', '.join(sorted(known))})",
                field="inpainting_models",
            )
    return [replace(model, inpainting=config.inpainting_models.get(model.id)) for model in models]
