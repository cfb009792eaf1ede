"""Eager PyTorch backend: diffusers' SDXL pipelines as they ship, with LoRAs and ControlNets."""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import StableDiffusionXLControlNetPipeline, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from engines.adapters import LoraAdapters
from engines.cache import release_memory
from engines.control import ControlUnavailable, DepthEstimator, prepare_control
from engines.hires import decode, load_vae, second_pass_schedule, upscaled_latents
from engines.image_edit import edit_pipeline, keep_outside_mask, load_edit_images, nothing_to_repaint, takes_size
from engines.loading import LOADING
from engines.preview import latent_preview
from engines.prompt_encoder import PromptEncoder
from engines.references import ReferenceAdapters
from engines.row_guidance import RowGuidedSDXLPipeline, RowScales, guides_only_by_cfg
from engines.schedulers import make_scheduler
from engines.step_loop import OnDone, StepLoop
from engines.tiling import tiled
from engines.weights import damaged_file
from forge.engine import (
    AssetError,
    GenerationResult,
    Hires,
    Job,
    JobCancelled,
    LoraWeight,
    ModelInfo,
    ModelLoadError,
    OutOfMemory,
    Vae,
    job_batch_key,
    views_batch_key,
)


def _control_rows(jobs: Sequence[Job], images: Sequence[Sequence[Image.Image]]) -> list[np.ndarray]:
    """For each ControlNet, every row's control image (`images[j]`: job j's, one per ControlNet; a job's image
    once per seed) as one array, converted as diffusers converts a PIL image: a MultiControlNet takes a batch of
    images per ControlNet only as an array or tensor, not as a list."""
    return [
        VaeImageProcessor.pil_to_numpy([own[index] for job, own in zip(jobs, images, strict=True) for _ in job.seeds])
        for index in range(len(jobs[0].controls))
    ]


def _row_ranges(jobs: Sequence[Job]) -> list[tuple[int, int]]:
    """Each job's rows in the batch: [begin, end)."""
    ranges, begin = [], 0
    for job in jobs:
        ranges.append((begin, begin + len(job.seeds)))
        begin += len(job.seeds)
    return ranges


def _stop_if_all_cancelled(jobs: Sequence[Job]) -> None:
    """A batch goes on while any of its jobs is wanted; a job cancelled alone just loses its images."""
    if all(job.cancel.is_set() for job in jobs):
        raise JobCancelled


def dtype_for(device: str) -> torch.dtype:
    return torch.float16 if device.startswith("cuda") else torch.float32


def module_bytes(module: Any) -> int:
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors if not t.is_meta)


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
        with LOADING:
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
            pipe.set_progress_bar_config(disable=True)
            pipe.to(device)
    except Exception as exc:
        local = Path(model.path)
        damaged = damaged_file(local) if local.exists() else None
        if damaged is not None:
            file, reason = damaged
            raise ModelLoadError(
                model.id, f"model {model.id!r}: {file} is corrupt or truncated ({reason})", file=str(file)
            ) from exc
        raise ModelLoadError(model.id, f"model {model.id!r} failed to load: {type(exc).__name__}: {exc}") from exc
    return pipe


def _rescale_args(pipe: Any, job: Job) -> dict[str, Any]:
    """guidance_rescale for the pipelines that take it (diffusers' SDXL ControlNet pipelines have none)."""
    if not job.guidance_rescale or "guidance_rescale" not in inspect.signature(pipe.__call__).parameters:
        return {}
    return {"guidance_rescale": job.guidance_rescale}


class EagerEngine:
    def __init__(self, model: ModelInfo, device: str) -> None:
        self.device = device
        self.model = model
        self.pipe = load_pipeline(model, device)
        # A batch's images are decoded one by one: the VAE in fp32 at 1024² needs gigabytes per image, and
        # decoding is compute-bound already at one image, so batching it would only raise the peak.
        self.pipe.vae.enable_slicing()
        self.adapters = LoraAdapters(self.pipe)
        # Tiny adapters load with every key checked: a missing one is an error, not a meta tensor.
        self.references = ReferenceAdapters(self.pipe, low_cpu_mem_usage=not model.is_tiny)
        # A1111's prompt language, clip skip and embeddings; keeps the last prompts' encodings.
        embeddings = Path(model.embeddings_dir) if model.embeddings_dir else None
        self.prompts = PromptEncoder(self.pipe, embeddings)
        self._controlnets: dict[str, Any] = {}
        self._depth: DepthEstimator | None = None
        self._inpainting: Any = None
        self._vaes: dict[Vae, Any] = {}  # configured VAEs, loaded once each
        self._upscalers: dict[str, Any] = {}  # the hires fix's upscaler models, by file

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
        return self.run_batch([job])[0]

    def run_batch(self, jobs: Sequence[Job]) -> list[GenerationResult]:
        first = jobs[0]
        if any(job_batch_key(job) != job_batch_key(first) for job in jobs):
            raise ValueError("jobs in one batch must share model, LoRAs, size, steps, sampler and guided-ness")
        if len(jobs) > 1:
            if first.image_edit is not None:
                raise ValueError("jobs with an init image run alone")
            if any(views_batch_key(job) != views_batch_key(first) for job in jobs):
                raise ValueError("jobs in one batch must share ControlNet settings, references and hires fix")
        _stop_if_all_cancelled(jobs)
        scales = [job.guidance_scale for job in jobs for _ in job.seeds]
        mixed_scales = first.guidance_scale > 1 and len(set(scales)) > 1
        # A UNet that embeds its scale, and diffusers' ControlNet pipeline, apply one scale to the whole batch.
        if mixed_scales and (first.controls or not guides_only_by_cfg(self.pipe)):
            return self._run_in_parts(jobs, lambda job: job.guidance_scale)
        guided = first.guidance_scale > 1 and guides_only_by_cfg(self.pipe)
        if len(jobs) > 1 and len({self.prompts.chunk_count(job, guided) for job in jobs}) > 1:
            # Rows of one UNet call share the prompt's length: a part for each length (each job's own images).
            return self._run_in_parts(jobs, lambda job: self.prompts.chunk_count(job, guided))
        # 1. LoRAs: loaded once per pipeline, switched by adapter weights (the batch shares one set).
        self._activate_loras(first.loras)

        # 2. Each job's control images and the ControlNets (the batch shares their settings).
        control_images = [[self._control_image(control, job) for control in job.controls] for job in jobs]
        controlnets = [self._controlnet(control.type) for control in first.controls]

        # 3. A request-scoped pipeline: shares every weight, owns a fresh scheduler (schedulers hold state).
        # img2img and inpainting start from the job's image (a job with one is a batch of one).
        components = self._components(first)
        control_args: dict[str, Any] = {}
        pipe: Any
        edit = first.image_edit
        edit_images = load_edit_images(edit, first.width, first.height) if edit is not None else None
        if edit is not None and edit_images is not None:
            if nothing_to_repaint(edit, first.steps):
                return [GenerationResult(images=[edit_images.init.copy() for _ in first.seeds], denoise_s=0.0)]
            pipe, control_args = edit_pipeline(
                components, controlnets, edit_images, edit, self._inpainting_unet(first) if edit.mask else None
            )
            if controlnets:
                control_args |= {
                    "control_image": control_images[0],
                    "controlnet_conditioning_scale": [c.strength for c in first.controls],
                    "control_guidance_start": [c.start for c in first.controls],
                    "control_guidance_end": [c.end for c in first.controls],
                }
        elif controlnets:
            pipe = StableDiffusionXLControlNetPipeline(**components, controlnet=controlnets)
            control_args = {
                "image": control_images[0] if len(jobs) == 1 else _control_rows(jobs, control_images),
                "controlnet_conditioning_scale": [c.strength for c in first.controls],
                "control_guidance_start": [c.start for c in first.controls],
                "control_guidance_end": [c.end for c in first.controls],
            }
        elif mixed_scales:  # CFG is element-wise: one UNet pass serves rows with different scales
            pipe = RowGuidedSDXLPipeline(**components)
            pipe.row_scales = RowScales(scales)
        else:
            pipe = StableDiffusionXLPipeline(**components)
        pipe.set_progress_bar_config(disable=True)

        # 4. One CPU generator per image: image k of seed s is the same alone, in any batch and on any device.
        generators = [torch.Generator("cpu").manual_seed(seed) for job in jobs for seed in job.seeds]
        rows = _row_ranges(jobs)

        # 5. Per-step callback: cancel flags, each job's progress and an occasional latent preview. The hires
        # fix's second pass counts on from the first's steps.
        hires = first.hires
        hires_steps = second_pass_schedule(hires.steps, hires.denoise)[1] if hires is not None else 0
        steps_before = [0]

        def on_step_end(pipeline: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            _stop_if_all_cancelled(jobs)
            done = steps_before[0] + step + 1
            total = first.steps + hires_steps if hires is not None else pipeline.num_timesteps
            if first.references is not None:
                self.references.at_step(done)
            want_preview = first.preview_every and done % first.preview_every == 0 and done < total
            for job, (begin, _) in zip(jobs, rows, strict=True):
                if job.on_progress is None or job.cancel.is_set():
                    continue
                watched = want_preview and (job.wants_preview is None or job.wants_preview())
                preview = latent_preview(tensors["latents"][begin:], job.preview_size) if watched else None
                job.on_progress(done, total, preview)
            return {}

        # 6. Each job's own prompts, encoded apart and stacked (row r of the batch is one image of one job),
        # then denoise and decode; seamless tiles wrap the convolutions of this pipeline's modules (UNet, VAE,
        # ControlNets) around for the job only (the batch shares its tiling).
        started = time.perf_counter()
        try:
            embeddings = self._encode_prompts(pipe, jobs)
            size = {"width": first.width, "height": first.height} if takes_size(pipe) else {}
            with tiled(pipe.components.values(), first.tiling):
                unconditional = embeddings["negative_prompt_embeds"] is not None
                with self._references_for(first, guided=unconditional) as reference:
                    output = pipe(
                        **embeddings,
                        **size,
                        num_inference_steps=first.steps,
                        guidance_scale=first.guidance_scale,
                        num_images_per_prompt=1,
                        generator=generators,
                        callback_on_step_end=on_step_end,
                        callback_on_step_end_tensor_inputs=["latents"],
                        output_type="pil" if hires is None else "latent",
                        **control_args,
                        **reference,
                        **_rescale_args(pipe, first),
                    )
                if hires is not None:
                    steps_before[0] = first.steps
                    images = self._hires_pass(pipe, components, jobs, output.images, embeddings, on_step_end)
                else:
                    images = list(output.images)
        except torch.OutOfMemoryError as exc:
            release_memory(self.device)
            raise OutOfMemory(str(exc)) from exc
        denoise_s = time.perf_counter() - started
        if edit_images is not None:
            images = [keep_outside_mask(image, edit_images) for image in images]
        return [GenerationResult(images=images[begin:end], denoise_s=denoise_s) for begin, end in rows]

    def _components(self, job: Job) -> dict[str, Any]:
        """The pipeline's modules for `job`: a fresh scheduler set up for the model's family, and the job's VAE."""
        scheduler = make_scheduler(
            job.scheduler, self.pipe.scheduler.config, self.model.prediction, self.model.zero_snr
        )
        components = {**self.pipe.components, "scheduler": scheduler}
        if job.vae is not None:
            components["vae"] = self.vae(job.vae)
        return components

    def vae(self, vae: Vae) -> Any:
        """A configured VAE, loaded on first use and kept (the model's own stays in the pipeline)."""
        if vae not in self._vaes:
            try:
                with LOADING:
                    self._vaes[vae] = load_vae(vae.source, self.pipe.vae, self.device)
            except Exception as exc:
                message = f"the VAE {vae.name!r} at {vae.source} failed to load: {exc}"
                raise AssetError("vae_unavailable", message) from exc
        return self._vaes[vae]

    def upscaler(self, hires: Hires) -> Any:
        """The hires fix's upscaler model (None for latent and Lanczos upscaling), loaded once."""
        if hires.upscaler in ("latent", "lanczos"):
            return None
        if hires.upscaler not in self._upscalers:
            from engines.upscale import Upscaler, UpscalerError

            if not Path(hires.upscaler).is_file():
                raise AssetError("postprocess_model_missing", f"the upscaler file {hires.upscaler} is missing")
            try:
                with LOADING:
                    self._upscalers[hires.upscaler] = Upscaler(Path(hires.upscaler), self.device)
            except UpscalerError as exc:
                raise AssetError("postprocess_model_invalid", str(exc)) from exc
        return self._upscalers[hires.upscaler]

    def _hires_pass(
        self,
        pipe: Any,
        components: dict[str, Any],
        jobs: Sequence[Job],
        latents: torch.Tensor,
        embeddings: dict[str, Any],
        on_step_end: Callable[..., dict[str, Any]],
    ) -> list[Any]:
        """The hires fix's second pass: the first pass's latents upscaled, then repainted by img2img at the larger
        size with fresh generators of the same seeds (as A1111 does)."""
        first = jobs[0]
        hires = first.hires
        assert hires is not None
        larger = upscaled_latents(pipe, latents, hires, self.upscaler(hires))
        asked, runs = second_pass_schedule(hires.steps, hires.denoise)
        if runs < 1:
            return decode(pipe, larger)
        scheduler = make_scheduler(
            first.scheduler, self.pipe.scheduler.config, self.model.prediction, self.model.zero_snr
        )
        img2img = StableDiffusionXLImg2ImgPipeline(**{**components, "scheduler": scheduler})
        img2img.set_progress_bar_config(disable=True)
        generators = [torch.Generator("cpu").manual_seed(seed) for job in jobs for seed in job.seeds]
        output = img2img(
            **embeddings,
            image=larger,
            strength=hires.denoise,
            num_inference_steps=asked,
            guidance_scale=first.guidance_scale,
            guidance_rescale=first.guidance_rescale,
            num_images_per_prompt=1,
            generator=generators,
            callback_on_step_end=on_step_end,
            callback_on_step_end_tensor_inputs=["latents"],
            output_type="pil",
        )
        return list(output.images)

    def run_steps(
        self,
        jobs: Sequence[Job],
        on_done: OnDone,
        joiners: Callable[[int], list[Job]],
        max_images: int,
        on_step: Callable[[int], None] | None = None,
    ) -> None:
        """Step-level batching (see engines.step_loop): `jobs` and the jobs `joiners` hands over share the LoRA
        set, size and guided-ness; each ends through `on_done`."""
        try:
            self._activate_loras(jobs[0].loras)
        except AssetError as failure:
            for job in jobs:
                on_done(job, failure)
            return
        loop = StepLoop(self.pipe, vae=self.vae, upscaler=self.upscaler, prompts=self.prompts)
        loop.run(jobs, on_done, joiners, max_images, on_step)

    def _activate_loras(self, loras: list[LoraWeight]) -> None:
        try:
            self.adapters.activate(loras)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            names = ", ".join(f"{lora.name} ({lora.path})" for lora in loras)
            raise AssetError("lora_invalid", f"could not apply LoRA {names}: {exc}") from exc

    def _references_for(self, job: Job, guided: bool) -> AbstractContextManager[dict[str, Any]]:
        if job.references is None:
            return nullcontext({})
        steps = job.steps
        if job.image_edit is not None:  # img2img runs the last `strength` of the steps
            steps = max(1, min(int(job.steps * job.image_edit.strength), job.steps))
        return self.references.attached(job.references, guided=guided, steps=steps, width=job.width, height=job.height)

    def _run_in_parts(self, jobs: Sequence[Job], key_of: Callable[[Job], object]) -> list[GenerationResult]:
        """A batch for each value of `key_of` (the guidance scale, for a UNet that embeds one scale per batch; the
        prompts' length in chunks), results in job order. A part whose jobs were all cancelled gives them no
        images (their flags end them as cancelled)."""
        results: dict[int, GenerationResult] = {}
        keys = [key_of(job) for job in jobs]
        for key in dict.fromkeys(keys):
            indices = [index for index, job_key in enumerate(keys) if job_key == key]
            try:
                part = self.run_batch([jobs[index] for index in indices])
            except JobCancelled:
                part = [GenerationResult(images=[], denoise_s=0.0) for _ in indices]
            results.update(zip(indices, part, strict=True))
        _stop_if_all_cancelled(jobs)
        return [results[index] for index in range(len(jobs))]

    def _encode_prompts(self, pipe: Any, jobs: Sequence[Job]) -> dict[str, Any]:
        """Prompt and pooled embeddings for every row, each job's prompts encoded apart (A1111's prompt language,
        the job's clip skip; a plain prompt exactly as the pipeline encodes it)."""
        guided = jobs[0].guidance_scale > 1 and guides_only_by_cfg(pipe)
        parts: list[tuple[Any, ...]] = [self.prompts.encode(job, guided).for_images(len(job.seeds)) for job in jobs]
        names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
        return {
            name: torch.cat([part[index] for part in parts]) if parts[0][index] is not None else None
            for index, name in enumerate(names)
        }

    def _inpainting_unet(self, job: Job) -> Any:
        """The model's inpainting UNet, loaded on first use; None when it has none, or when the job's LoRAs or
        references must act (they are applied to the base UNet)."""
        source = self.model.inpainting
        if source is None or job.loras or job.references is not None:
            return None
        if self._inpainting is None:
            from diffusers import UNet2DConditionModel

            try:
                with LOADING:
                    unet = UNet2DConditionModel.from_pretrained(
                        source, subfolder="unet", dtype=dtype_for(self.device), variant=self.model.variant
                    )
            except Exception as exc:
                raise AssetError(
                    "inpainting_unavailable", f"the inpainting checkpoint at {source} failed to load: {exc}"
                ) from exc
            if unet.config.in_channels != 9:
                raise AssetError(
                    "inpainting_unavailable",
                    f"{source} has a {unet.config.in_channels}-channel UNet; an inpainting one has 9",
                )
            self._inpainting = unet.to(self.device)
        return self._inpainting

    def _controlnet(self, kind: str) -> Any:
        if kind not in self._controlnets:
            from diffusers import ControlNetModel

            source = self.model.controlnets.get(kind)
            if not source:
                raise AssetError("controlnet_unavailable", f"no {kind} ControlNet is installed for {self.model.id}")
            try:
                with LOADING:
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
                with LOADING:
                    self._depth = DepthEstimator(self.model.depth_model, self.device)
            except Exception as exc:
                raise AssetError(
                    "control_invalid", f"the depth model at {self.model.depth_model} failed to load: {exc}"
                ) from exc
        return self._depth

    def memory_bytes(self) -> int:
        modules = [m for m in self.pipe.components.values() if isinstance(m, torch.nn.Module)]
        modules += list(self._controlnets.values()) + self.references.memory_modules() + list(self._vaes.values())
        modules += [upscaler.model for upscaler in self._upscalers.values()]
        if self._inpainting is not None:
            modules.append(self._inpainting)
        if self._depth is not None:
            modules.append(self._depth.model)
        return sum(module_bytes(m) for m in modules)

    def close(self) -> None:
        """Drop the pipeline and its extras; the model cache then collects the garbage once (or, at shutdown,
        leaves it to the collector)."""
        del self.pipe, self.adapters, self.references
        self._controlnets.clear()
        self._vaes.clear()
        self._upscalers.clear()
        self._depth = self._inpainting = None
