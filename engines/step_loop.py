"""Step-level batching: one UNet call per step over every active task, each with its own timesteps, prompts,
guidance scale, sampler and step count; a task joins at a step boundary and leaves when its steps are done.

It follows diffusers' SDXL text-to-image loop exactly, per task: the same initial noise (one CPU generator per
image), the same prompt encoding, added time ids, scheduler scaling and steps, and the same decoding. Only the
UNet call is shared; its rows are each task's rows side by side (unconditional then conditional, as the
pipeline orders them), with one timestep per row. So a task's images are the ones it gets alone, up to the
UNet's own batch-size dependent rounding.

The device thread runs it. Between steps it asks `joiners` for new work: a compatible task that arrived while
others were denoising starts at the next step instead of after them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import StableDiffusionXLPipeline

from engines.cache import release_memory
from engines.preview import latent_preview
from engines.row_guidance import guides_only_by_cfg
from engines.schedulers import make_scheduler
from forge.engine import GenerationResult, Job, JobCancelled, OutOfMemory

Outcome = GenerationResult | BaseException
OnDone = Callable[[Job, Outcome], None]


@dataclass
class _Task:
    job: Job
    pipe: Any  # a request-scoped pipeline: its own scheduler, the engine's weights
    timesteps: list[Any]
    latents: torch.Tensor
    prompt_embeds: torch.Tensor  # rows in UNet order: unconditional then conditional when guided
    text_embeds: torch.Tensor
    time_ids: torch.Tensor
    extra_step: dict[str, Any]
    guided: bool
    guidance_embeds: torch.Tensor | None  # a guidance-distilled UNet's (LCM) embedding of each row's scale
    started: float = field(default_factory=time.perf_counter)
    step: int = 0
    failed: bool = False  # ended through on_done already (out of memory alone)

    @property
    def images(self) -> int:
        return int(self.latents.shape[0])

    @property
    def rows(self) -> int:
        return self.images * (2 if self.guided else 1)


class StepLoop:
    """Step-level batching on one SDXL pipeline (its weights shared, never copied)."""

    def __init__(self, pipe: StableDiffusionXLPipeline) -> None:
        self.pipe = pipe

    def run(
        self,
        jobs: Sequence[Job],
        on_done: OnDone,
        joiners: Callable[[int], list[Job]] = lambda free_images: [],
        max_images: int = 1 << 30,
        on_step: Callable[[int], None] | None = None,
    ) -> None:
        """Denoise until every job, and every job `joiners` hands over between steps, is done. `joiners` gets
        the room still free (in images) and returns jobs that fit it. Each job ends through `on_done`, once.
        `on_step` hears the images of each step's UNet call."""
        active: list[_Task] = []
        for job in jobs:
            self._admit(job, active, on_done)
        while active:
            free = max_images - sum(task.images for task in active)
            for job in joiners(free) if free > 0 else []:
                self._admit(job, active, on_done)
            for task in [task for task in active if task.job.cancel.is_set()]:
                active.remove(task)
                on_done(task.job, JobCancelled())
            if active:
                if on_step is not None:
                    on_step(sum(task.images for task in active))
                self._step(active, on_done)
            active[:] = [task for task in active if not task.failed]
            for task in [task for task in active if task.step == len(task.timesteps)]:
                active.remove(task)
                on_done(task.job, self._finish(task))

    # -- joining --

    def _admit(self, job: Job, active: list[_Task], on_done: OnDone) -> None:
        try:
            active.append(self._start(job))
        except torch.OutOfMemoryError as exc:
            release_memory(str(self.pipe.device))
            on_done(job, OutOfMemory(str(exc)))
        except Exception as exc:  # this job's own failure; the others go on
            on_done(job, exc)

    def _start(self, job: Job) -> _Task:
        """Exactly what the pipeline prepares before its loop, for this job alone."""
        base = self.pipe
        scheduler = make_scheduler(job.scheduler, base.scheduler.config)
        pipe = StableDiffusionXLPipeline(**{**base.components, "scheduler": scheduler})
        device = pipe._execution_device
        by_cfg = guides_only_by_cfg(pipe)
        guided = job.guidance_scale > 1 and by_cfg
        count = len(job.seeds)
        positive, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt=job.prompt,
            device=device,
            num_images_per_prompt=count,
            do_classifier_free_guidance=guided,
            negative_prompt=job.negative_prompt or None,
        )
        scheduler.set_timesteps(job.steps, device=device)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in job.seeds]
        latents = pipe.prepare_latents(
            count, pipe.unet.config.in_channels, job.height, job.width, positive.dtype, device, generators
        )
        projection = int(pooled.shape[-1]) if pipe.text_encoder_2 is None else pipe.text_encoder_2.config.projection_dim
        size = (job.height, job.width)
        time_ids = pipe._get_add_time_ids(
            size, (0, 0), size, dtype=positive.dtype, text_encoder_projection_dim=projection
        )
        guidance_embeds = None
        if not by_cfg:  # the scale is a UNet input, one per row
            scales = torch.tensor(job.guidance_scale - 1).repeat(count)
            embedding = pipe.get_guidance_scale_embedding(scales, embedding_dim=pipe.unet.config.time_cond_proj_dim)
            guidance_embeds = embedding.to(device=device, dtype=latents.dtype)
        if guided:
            positive = torch.cat([negative, positive])
            pooled = torch.cat([negative_pooled, pooled])
            time_ids = torch.cat([time_ids, time_ids])
        return _Task(
            job=job,
            pipe=pipe,
            timesteps=list(scheduler.timesteps),
            latents=latents,
            prompt_embeds=positive.to(device),
            text_embeds=pooled.to(device),
            time_ids=time_ids.to(device).repeat(count, 1),
            extra_step=pipe.prepare_extra_step_kwargs(generators, 0.0),
            guided=guided,
            guidance_embeds=guidance_embeds,
        )

    # -- one step --

    def _step(self, tasks: list[_Task], on_done: OnDone) -> None:
        """One UNet call over `tasks`; on running out of memory, half the tasks at a time, down to one task,
        which alone fails (the step is repeated, never half-applied)."""
        try:
            predictions = self._unet(tasks)
        except torch.OutOfMemoryError as exc:
            release_memory(str(self.pipe.device))
            if len(tasks) == 1:
                tasks[0].failed = True
                on_done(tasks[0].job, OutOfMemory(str(exc)))
                return
            half = len(tasks) // 2
            for part in (tasks[:half], tasks[half:]):
                self._step(part, on_done)
            return
        for task, prediction in zip(tasks, predictions, strict=True):
            self._advance(task, prediction)

    def _unet(self, tasks: list[_Task]) -> list[torch.Tensor]:
        inputs, timesteps = [], []
        for task in tasks:
            t = task.timesteps[task.step]
            latents = torch.cat([task.latents] * 2) if task.guided else task.latents
            inputs.append(task.pipe.scheduler.scale_model_input(latents, t))
            timesteps.append(torch.full((latents.shape[0],), float(t), device=latents.device))

        embeds = [task.guidance_embeds for task in tasks if task.guidance_embeds is not None]
        unet = self.pipe.unet
        with torch.no_grad():  # as the pipeline calls it: a compiled UNet then meets one kind of tensor
            output = unet(
                torch.cat(inputs),
                torch.cat(timesteps),
                timestep_cond=torch.cat(embeds) if embeds else None,
                encoder_hidden_states=torch.cat([task.prompt_embeds for task in tasks]),
                added_cond_kwargs={
                    "text_embeds": torch.cat([task.text_embeds for task in tasks]),
                    "time_ids": torch.cat([task.time_ids for task in tasks]),
                },
                return_dict=False,
            )[0]
        return list(output.split([task.rows for task in tasks]))

    def _advance(self, task: _Task, prediction: torch.Tensor) -> None:
        job, t = task.job, task.timesteps[task.step]
        if task.guided:
            uncond, text = prediction.chunk(2)
            prediction = uncond + job.guidance_scale * (text - uncond)
        with torch.inference_mode():
            task.latents = task.pipe.scheduler.step(prediction, t, task.latents, **task.extra_step, return_dict=False)[
                0
            ]
        task.step += 1
        if job.on_progress is not None and task.step < len(task.timesteps):
            watched = job.preview_every and task.step % job.preview_every == 0
            watched = watched and (job.wants_preview is None or job.wants_preview())
            preview = latent_preview(task.latents, job.preview_size) if watched else None
            job.on_progress(task.step, len(task.timesteps), preview)

    def _finish(self, task: _Task) -> Outcome:
        """Decode as the pipeline does at the end of its call: an fp16 VAE that asks for it runs in fp32 for the
        decode, then goes back to fp16 (the engine's VAE is shared); the engine's VAE slicing decodes one image
        at a time, since the VAE's peak is per image."""
        pipe, vae = task.pipe, task.pipe.vae
        upcast = vae.dtype == torch.float16 and vae.config.force_upcast
        try:
            with torch.inference_mode():
                if upcast:
                    vae.to(dtype=torch.float32)
                latents = task.latents.to(vae.dtype)
                decoded = vae.decode(self._scaled_for_vae(vae.config, latents), return_dict=False)[0]
                images = pipe.image_processor.postprocess(decoded, output_type="pil")
        except torch.OutOfMemoryError as exc:
            release_memory(str(self.pipe.device))
            return OutOfMemory(str(exc))
        except Exception as exc:  # this task's own failure; the others go on
            return exc
        finally:
            if upcast:
                vae.to(dtype=torch.float16)
        if task.job.on_progress is not None:
            task.job.on_progress(len(task.timesteps), len(task.timesteps), None)
        return GenerationResult(images=images, denoise_s=time.perf_counter() - task.started)

    @staticmethod
    def _scaled_for_vae(config: Any, latents: torch.Tensor) -> torch.Tensor:
        if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
            mean = torch.tensor(config.latents_mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(config.latents_std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            scaled: torch.Tensor = latents * std / config.scaling_factor + mean
            return scaled
        unscaled: torch.Tensor = latents / config.scaling_factor
        return unscaled
