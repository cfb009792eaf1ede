"""Eager PyTorch backend: diffusers' StableDiffusionXLPipeline as it ships."""

from __future__ import annotations

import gc
import time
from typing import Any

import torch
from diffusers import StableDiffusionXLPipeline

from engines.preview import latent_preview
from engines.schedulers import make_scheduler
from forge.engine import GenerationResult, Job, JobCancelled, ModelInfo, OutOfMemory


def dtype_for(device: str) -> torch.dtype:
    return torch.float16 if device.startswith("cuda") else torch.float32


class EagerEngine:
    def __init__(self, model: ModelInfo, device: str) -> None:
        self.device = device
        self.model = model
        pipe = StableDiffusionXLPipeline.from_pretrained(
            model.path, dtype=dtype_for(device), variant=model.variant, use_safetensors=True
        )
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(device)

    def warm(self) -> None:
        """One short run at the default size, so the first user request does not pay for lazy setup."""
        side = self.model.default_size
        self.run(
            Job(
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
        # 1. A request-scoped pipeline: shares every weight, owns a fresh scheduler (schedulers hold state).
        components = {**self.pipe.components, "scheduler": make_scheduler(job.scheduler, self.pipe.scheduler.config)}
        pipe = StableDiffusionXLPipeline(**components)
        pipe.set_progress_bar_config(disable=True)

        # 2. One CPU generator per image: image k of seed s is reproducible alone and on any device.
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in job.seeds]

        # 3. Per-step callback: cancel flag, progress and an occasional latent preview.
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

        # 4. Denoise and decode.
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
            )
        except torch.OutOfMemoryError as exc:
            self._release_cached_memory()
            raise OutOfMemory(str(exc)) from exc
        return GenerationResult(images=list(output.images), denoise_s=time.perf_counter() - started)

    def close(self) -> None:
        del self.pipe
        self._release_cached_memory()

    def _release_cached_memory(self) -> None:
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
