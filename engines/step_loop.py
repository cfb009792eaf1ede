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
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import rescale_noise_cfg

from engines.cache import release_memory
from engines.hires import scaled_for_vae, second_pass_schedule, upscaled_latents
from engines.preview import latent_preview
from engines.prompt_encoder import PromptEncoder
from engines.row_guidance import guides_only_by_cfg
from engines.schedulers import make_scheduler
from engines.tiling import tiled
from forge.engine import GenerationResult, Hires, Job, JobCancelled, OutOfMemory, Vae

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
    # The hires fix: the second pass is a task of its own at the larger size; progress counts both passes.
    second_pass: bool = False
    steps_before: int = 0
    steps_total: int = 0

    @property
    def images(self) -> int:
        return int(self.latents.shape[0])

    @property
    def rows(self) -> int:
        return self.images * (2 if self.guided else 1)


class StepLoop:
    """Step-level batching on one SDXL pipeline (its weights shared, never copied)."""

    def __init__(
        self,
        pipe: StableDiffusionXLPipeline,
        vae: Callable[[Vae], Any] | None = None,
        upscaler: Callable[[Hires], Any] | None = None,
        prompts: PromptEncoder | None = None,
    ) -> None:
        """`vae` gives a configured VAE's module, `upscaler` the hires fix's upscaler model, `prompts` the prompt
        encoder (the engine's own, with its embeddings and cache)."""
        self.pipe = pipe
        self.prompts = prompts or PromptEncoder(pipe)
        self._vae = vae
        self._upscaler = upscaler

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
                if task.job.hires is not None and not task.second_pass:
                    self._admit_second_pass(task, active, on_done)
                else:
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

    def _components(self, job: Job) -> dict[str, Any]:
        """The engine's modules with a fresh scheduler for the model's family, and the job's VAE."""
        base = self.pipe
        scheduler = make_scheduler(job.scheduler, base.scheduler.config, job.model.prediction, job.model.zero_snr)
        components = {**base.components, "scheduler": scheduler}
        if job.vae is not None and self._vae is not None:
            components["vae"] = self._vae(job.vae)
        return components

    def _admit_second_pass(self, task: _Task, active: list[_Task], on_done: OnDone) -> None:
        """The hires fix: once the first pass is done, its second pass joins the loop at the larger size (its UNet
        calls shared with the other tasks of that size)."""
        try:
            second = self._start_second_pass(task)
        except torch.OutOfMemoryError as exc:
            release_memory(str(self.pipe.device))
            on_done(task.job, OutOfMemory(str(exc)))
            return
        except Exception as exc:  # this job's own failure; the others go on
            on_done(task.job, exc)
            return
        if second is None:  # nothing to repaint: the upscaled latents are the result
            on_done(task.job, self._finish(task))
        else:
            active.append(second)

    def _start_second_pass(self, task: _Task) -> _Task | None:
        """What diffusers' SDXL img2img pipeline prepares before its loop, from the upscaled latents, with fresh
        generators of the job's seeds (as A1111 seeds its hires pass)."""
        job, hires = task.job, task.job.hires
        assert hires is not None
        with tiled([task.pipe.vae], job.tiling):  # a decode and encode for an image upscaler
            larger = upscaled_latents(
                task.pipe, task.latents, hires, self._upscaler(hires) if self._upscaler is not None else None
            )
        asked, runs = second_pass_schedule(hires.steps, hires.denoise)
        if runs < 1:
            task.latents = larger
            return None
        components = self._components(job)
        pipe = StableDiffusionXLImg2ImgPipeline(**components)
        device = pipe._execution_device
        scheduler = pipe.scheduler
        scheduler.set_timesteps(asked, device=device)
        timesteps, _ = pipe.get_timesteps(asked, hires.denoise, device)
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in job.seeds]
        count = len(job.seeds)
        start = timesteps[:1].repeat(count)
        latents = pipe.prepare_latents(larger, start, count, 1, task.prompt_embeds.dtype, device, generators)
        size = (hires.height, hires.width)
        encoder = pipe.text_encoder_2
        projection = task.text_embeds.shape[-1] if encoder is None else encoder.config.projection_dim
        time_ids = StableDiffusionXLPipeline._get_add_time_ids(
            pipe, size, (0, 0), size, dtype=task.prompt_embeds.dtype, text_encoder_projection_dim=int(projection)
        )
        if task.guided:
            time_ids = torch.cat([time_ids, time_ids])
        return _Task(
            job=job,
            pipe=pipe,
            timesteps=list(timesteps),
            latents=latents,
            prompt_embeds=task.prompt_embeds,
            text_embeds=task.text_embeds,
            time_ids=time_ids.to(device).repeat(count, 1),
            extra_step=pipe.prepare_extra_step_kwargs(generators, 0.0),
            guided=task.guided,
            guidance_embeds=task.guidance_embeds,
            started=task.started,
            second_pass=True,
            steps_before=len(task.timesteps),
            steps_total=task.steps_total,
        )

    def _start(self, job: Job) -> _Task:
        """Exactly what the pipeline prepares before its loop, for this job alone."""
        components = self._components(job)
        scheduler = components["scheduler"]
        pipe = StableDiffusionXLPipeline(**components)
        device = pipe._execution_device
        by_cfg = guides_only_by_cfg(pipe)
        guided = job.guidance_scale > 1 and by_cfg
        count = len(job.seeds)
        positive, negative, pooled, negative_pooled = self.prompts.encode(job, guided).for_images(count)
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
            assert negative is not None and negative_pooled is not None  # encoded when guided
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
            steps_total=len(scheduler.timesteps)
            + (second_pass_schedule(job.hires.steps, job.hires.denoise)[1] if job.hires is not None else 0),
        )

    # -- one step --

    def _step(self, tasks: list[_Task], on_done: OnDone) -> None:
        """One UNet call over `tasks` (one for each latent size, prompt length and tiling among them: a hires fix's
        second pass shares its calls with tasks of its own size, a long prompt's with prompts of as many chunks,
        and seamless tiles pad the whole call circularly); on running out of memory, half the tasks at a time,
        down to one task, which alone fails (the step is repeated, never half-applied)."""
        sizes: dict[tuple[object, ...], list[_Task]] = {}
        for task in tasks:
            shape = (*(int(side) for side in task.latents.shape[2:]), int(task.prompt_embeds.shape[1]))
            sizes.setdefault((*shape, task.job.tiling), []).append(task)
        if len(sizes) > 1:
            for group in sizes.values():
                self._step(group, on_done)
            return
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
        # as the pipeline calls it (no_grad): a compiled UNet then meets one kind of tensor; _step gave one tiling
        with tiled([unet], tasks[0].job.tiling), torch.no_grad():
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
            if job.guidance_rescale > 0:  # as the pipeline rescales, after guidance
                prediction = rescale_noise_cfg(prediction, text, guidance_rescale=job.guidance_rescale)
        with torch.inference_mode():
            task.latents = task.pipe.scheduler.step(prediction, t, task.latents, **task.extra_step, return_dict=False)[
                0
            ]
        task.step += 1
        done, total = task.steps_before + task.step, task.steps_total or len(task.timesteps)
        if job.on_progress is not None and done < total:
            watched = job.preview_every and task.step % job.preview_every == 0
            watched = watched and (job.wants_preview is None or job.wants_preview())
            preview = latent_preview(task.latents, job.preview_size) if watched else None
            job.on_progress(done, total, preview)

    def _finish(self, task: _Task) -> Outcome:
        """Decode as the pipeline does at the end of its call: an fp16 VAE that asks for it runs in fp32 for the
        decode, then goes back to fp16 (the engine's VAE is shared); the engine's VAE slicing decodes one image
        at a time, since the VAE's peak is per image."""
        pipe, vae = task.pipe, task.pipe.vae
        upcast = vae.dtype == torch.float16 and vae.config.force_upcast
        try:
            with tiled([vae], task.job.tiling), torch.inference_mode():
                if upcast:
                    vae.to(dtype=torch.float32)
                latents = task.latents.to(vae.dtype)
                decoded = vae.decode(scaled_for_vae(vae.config, latents), return_dict=False)[0]
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
            total = task.steps_total or len(task.timesteps)
            task.job.on_progress(total, total, None)
        return GenerationResult(images=images, denoise_s=time.perf_counter() - task.started)
