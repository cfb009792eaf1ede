"""Eager PyTorch backend: diffusers' SDXL pipelines as they ship, with LoRAs and ControlNets."""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionXLControlNetPipeline, StableDiffusionXLPipeline

from engines.adapters import LoraAdapters
from engines.control import ControlUnavailable, DepthEstimator, prepare_control
from engines.preview import latent_preview
from engines.schedulers import make_scheduler
from engines.weights import damaged_file
from forge.engine import (
    AssetError,
    GenerationResult,
    Job,
    JobCancelled,
    ModelInfo,
    ModelLoadError,
    OutOfMemory,
)


def dtype_for(device: str) -> torch.dtype:
    return torch.float16 if device.startswith("cuda") else torch.float32


def module_bytes(module: Any) -> int:
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


LDM_TEXT_ENCODER_PREFIX = "conditioner.embedders."


def text_encoders_if_missing(model: ModelInfo, dtype: torch.dtype) -> dict[str, Any]:
    """A checkpoint without text encoders (some ship UNet and VAE only) takes them from its config folder."""
    from safetensors import safe_open
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    with safe_open(model.path, framework="pt") as tensors:
        if any(key.startswith(LDM_TEXT_ENCODER_PREFIX) for key in tensors.keys()):  # noqa: SIM118
            return {}
    return {
        "text_encoder": CLIPTextModel.from_pretrained(model.config, subfolder="text_encoder", dtype=dtype),
        "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(
            model.config, subfolder="text_encoder_2", dtype=dtype
        ),
    }


def load_pipeline(model: ModelInfo, device: str) -> StableDiffusionXLPipeline:
    """from_pretrained for a diffusers folder or repo, from_single_file for one checkpoint file.

    A failed load becomes ModelLoadError naming the damaged file when one is found."""
    try:
        if model.format == "single_file":
            dtype = dtype_for(device)
            pipe = StableDiffusionXLPipeline.from_single_file(
                model.path,
                config=model.config,
                dtype=dtype,
                local_files_only=True,
                **text_encoders_if_missing(model, dtype),
            )
        else:
            pipe = StableDiffusionXLPipeline.from_pretrained(
                model.path, dtype=dtype_for(device), variant=model.variant, use_safetensors=True
            )
    except Exception as exc:
        local = Path(model.path)
        damaged = damaged_file(local) if local.exists() else None
        if damaged is not None:
            file, reason = damaged
            raise ModelLoadError(
                model.id, f"model {model.id!r}: {file} is corrupt or truncated ({reason})", file=str(file)
            ) from exc
        raise ModelLoadError(model.id, f"model {model.id!r} failed to load: {type(exc).__name__}: {exc}") from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


class EagerEngine:
    def __init__(self, model: ModelInfo, device: str) -> None:
        self.device = device
        self.model = model
        self.pipe = load_pipeline(model, device)
        self.adapters = LoraAdapters(self.pipe)
        self._controlnets: dict[str, Any] = {}
        self._depth: DepthEstimator | None = None

    def warm(self) -> None:
        """One short run at the default size, so the first user request does not pay for lazy setup."""
        side = self.model.default_size
        self.run(
            Job(
                model=self.model,
                prompt="warm-up",
                negative_prompt="",
                width=side,
                height=side,
                seeds=[0],
                steps=2,
                guidance_scale=self.model.default_guidance,
                scheduler="euler",
            )
        )

    def run(self, job: Job) -> GenerationResult:
        if job.cancel.is_set():
            raise JobCancelled
        # 1. LoRAs: loaded once per pipeline, switched by adapter weights.
        try:
            self.adapters.activate(job.loras)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            names = ", ".join(f"{lora.name} ({lora.path})" for lora in job.loras)
            raise AssetError("lora_invalid", f"could not apply LoRA {names}: {exc}") from exc

        # 2. Control images and their ControlNets.
        control_images = [self._control_image(control, job) for control in job.controls]
        controlnets = [self._controlnet(control.type) for control in job.controls]

        # 3. A request-scoped pipeline: shares every weight, owns a fresh scheduler (schedulers hold state).
        components = {**self.pipe.components, "scheduler": make_scheduler(job.scheduler, self.pipe.scheduler.config)}
        control_args: dict[str, Any] = {}
        pipe: Any
        if controlnets:
            pipe = StableDiffusionXLControlNetPipeline(**components, controlnet=controlnets)
            control_args = {
                "image": control_images,
                "controlnet_conditioning_scale": [c.strength for c in job.controls],
                "control_guidance_start": [c.start for c in job.controls],
                "control_guidance_end": [c.end for c in job.controls],
            }
        else:
            pipe = StableDiffusionXLPipeline(**components)
        pipe.set_progress_bar_config(disable=True)

        # 4. One CPU generator per image: image k of seed s is reproducible alone and on any device.
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in job.seeds]

        # 5. Per-step callback: cancel flag, progress and an occasional latent preview.
        def on_step_end(pipeline: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            if job.cancel.is_set():
                raise JobCancelled
            done, total = step + 1, pipeline.num_timesteps
            preview = None
            if job.preview_every and done % job.preview_every == 0 and done < total:
                preview = latent_preview(tensors["latents"], job.preview_size)
            if job.on_progress is not None:
                job.on_progress(done, total, preview)
            return {}

        # 6. Denoise and decode.
        started = time.perf_counter()
        try:
            output = pipe(
                prompt=job.prompt,
                negative_prompt=job.negative_prompt or None,
                width=job.width,
                height=job.height,
                num_inference_steps=job.steps,
                guidance_scale=job.guidance_scale,
                num_images_per_prompt=len(job.seeds),
                generator=generators,
                callback_on_step_end=on_step_end,
                callback_on_step_end_tensor_inputs=["latents"],
                output_type="pil",
                **control_args,
            )
        except torch.OutOfMemoryError as exc:
            self._release_cached_memory()
            raise OutOfMemory(str(exc)) from exc
        return GenerationResult(images=list(output.images), denoise_s=time.perf_counter() - started)

    def _controlnet(self, kind: str) -> Any:
        if kind not in self._controlnets:
            from diffusers import ControlNetModel

            source = self.model.controlnets.get(kind)
            if not source:
                raise AssetError("controlnet_unavailable", f"no {kind} ControlNet is installed for {self.model.id}")
            try:
                controlnet = ControlNetModel.from_pretrained(source, dtype=dtype_for(self.device))
            except Exception as exc:
                raise AssetError(
                    "controlnet_unavailable", f"the {kind} ControlNet at {source} failed to load: {exc}"
                ) from exc
            self._controlnets[kind] = controlnet.to(self.device)
        return self._controlnets[kind]

    def _control_image(self, control: Any, job: Job) -> Any:
        depth = None
        if control.type == "depth" and control.preprocess and control.image is not None:
            depth = self._depth_estimator()
        try:
            return prepare_control(control, job.width, job.height, depth)
        except ControlUnavailable as exc:
            raise AssetError("control_invalid", str(exc)) from exc
        except OSError as exc:
            raise AssetError("control_invalid", f"the {control.type} control image cannot be read: {exc}") from exc

    def _depth_estimator(self) -> DepthEstimator | None:
        if self._depth is None and self.model.depth_model:
            try:
                self._depth = DepthEstimator(self.model.depth_model, self.device)
            except Exception as exc:
                raise AssetError(
                    "control_invalid", f"the depth model at {self.model.depth_model} failed to load: {exc}"
                ) from exc
        return self._depth

    def memory_bytes(self) -> int:
        modules = [m for m in self.pipe.components.values() if isinstance(m, torch.nn.Module)]
        modules += list(self._controlnets.values())
        if self._depth is not None:
            modules.append(self._depth.model)
        return sum(module_bytes(m) for m in modules)

    def close(self) -> None:
        del self.pipe, self.adapters
        self._controlnets.clear()
        self._depth = None
        self._release_cached_memory()

    def _release_cached_memory(self) -> None:
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
