"""Every base model the server knows, and what each device has loaded. Engines write it, ingress and the
adapters read it. A model whose weights failed to load is `unavailable` (with the error) until a load
succeeds; requests for it are refused, and every other model keeps serving."""

from __future__ import annotations

import time
from collections.abc import Iterable
from enum import StrEnum

import msgspec

from forge.engine import ModelInfo
from forge.errors import InvalidRequest, ModelUnavailable


class ModelState(StrEnum):
    NOT_LOADED = "not_loaded"
    LOADING = "loading"
    LOADED = "loaded"
    UNAVAILABLE = "unavailable"


class DeviceLoad(msgspec.Struct, frozen=True, kw_only=True):
    device: str
    state: ModelState
    memory_bytes: int = 0


class ModelStatus(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    name: str
    source: str
    format: str
    default: bool
    tiny: bool
    state: ModelState
    error: str | None
    devices: list[DeviceLoad]
    default_size: int
    default_steps: int
    min_size: int
    max_size: int
    controlnets: list[str]
    depth_estimation: bool
    ip_adapters: list[str]  # for reference images; the first is the default
    inpainting: bool  # has an inpainting (9-channel) checkpoint
    last_used: float | None
    # The model family, which every sampler follows: "epsilon" or "v" (v-prediction), zero terminal SNR.
    prediction: str = "epsilon"
    zero_snr: bool = False
    # What requests that leave them out get: guidance_rescale, the VAE (None: the model's own).
    default_guidance_rescale: float = 0.0
    default_vae: str | None = None
    vaes: list[str] = []  # the configured VAEs a request may name


class ModelCatalog:
    def __init__(self, models: Iterable[ModelInfo], default_id: str) -> None:
        self._models = {model.id: model for model in models}
        self.default = self._models[default_id]
        self._loaded: dict[str, dict[str, int]] = {}  # device -> {model id: bytes}
        self._loading: dict[str, str] = {}  # device -> model id
        self._errors: dict[str, str] = {}
        self._last_used: dict[str, float] = {}

    def ids(self) -> list[str]:
        return list(self._models)

    def get(self, model_id: str | None) -> ModelInfo:
        """The model a request names (the default when it names none), if it can be used."""
        if model_id is None:
            return self.default
        model = self._models.get(model_id)
        if model is None:
            known = ", ".join(self._models)
            raise InvalidRequest(f"unknown model {model_id!r}; known models: {known}", field="model", rule="unknown")
        if model_id in self._errors:
            raise ModelUnavailable(self._errors[model_id], field="model", rule="unavailable")
        return model

    def find(self, model_id: str) -> ModelInfo | None:
        return self._models.get(model_id)

    def loading(self, device: str, model_id: str) -> None:
        self._loading[device] = model_id

    def loaded(self, device: str, models: dict[str, int]) -> None:
        """What `device` holds now; a model that loaded is usable again."""
        self._loading.pop(device, None)
        self._loaded[device] = dict(models)
        for model_id in models:
            self._errors.pop(model_id, None)

    def used(self, model_id: str) -> None:
        self._last_used[model_id] = time.time()

    def failed(self, device: str, model_id: str, message: str) -> None:
        if self._loading.get(device) == model_id:
            del self._loading[device]
        self._errors[model_id] = message

    def loaded_on(self, device: str) -> dict[str, int]:
        return dict(self._loaded.get(device, {}))

    def loading_devices(self) -> dict[str, str]:
        return dict(self._loading)

    def errors(self) -> dict[str, str]:
        return dict(self._errors)

    def holds(self, device: str, model_id: str) -> bool:
        return model_id in self._loaded.get(device, {})

    def is_loaded(self, model_id: str) -> bool:
        return any(model_id in models for models in self._loaded.values())

    def statuses(self) -> list[ModelStatus]:
        return [self._status(model) for model in self._models.values()]

    def status(self, model_id: str) -> ModelStatus | None:
        model = self._models.get(model_id)
        return self._status(model) if model is not None else None

    def _status(self, model: ModelInfo) -> ModelStatus:
        devices = []
        for device in sorted(set(self._loaded) | set(self._loading)):
            if self._loading.get(device) == model.id:
                devices.append(DeviceLoad(device=device, state=ModelState.LOADING))
            elif model.id in self._loaded.get(device, {}):
                size = self._loaded[device][model.id]
                devices.append(DeviceLoad(device=device, state=ModelState.LOADED, memory_bytes=size))
        if model.id in self._errors:
            state = ModelState.UNAVAILABLE
        elif any(d.state is ModelState.LOADED for d in devices):
            state = ModelState.LOADED
        elif devices:
            state = ModelState.LOADING
        else:
            state = ModelState.NOT_LOADED
        return ModelStatus(
            id=model.id,
            name=model.name,
            source=model.path,
            format=model.format,
            default=model.id == self.default.id,
            tiny=model.is_tiny,
            state=state,
            error=self._errors.get(model.id),
            devices=devices,
            default_size=model.default_size,
            default_steps=model.default_steps,
            min_size=model.min_size,
            max_size=model.max_size,
            controlnets=sorted(model.controlnets),
            depth_estimation=model.depth_model is not None,
            ip_adapters=list(model.ip_adapters),
            inpainting=model.inpainting is not None,
            last_used=self._last_used.get(model.id),
            prediction=model.prediction,
            zero_snr=model.zero_snr,
            default_guidance_rescale=model.guidance_rescale,
            default_vae=model.vae,
            vaes=list(model.vaes),
        )
