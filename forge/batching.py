"""Which queued tasks may share one UNet batch, and how long a batch may wait to fill."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from forge.requests import GenerationSpec

BatchKey = tuple[object, ...]

# Besides the model and the LoRA set: what every row of one UNet batch must share. Named once here for the
# scheduler's key on request specs and the engine's check on jobs (both have these fields). Guidance scales
# may differ, since classifier-free guidance is element-wise, but each row either has guidance (scale > 1)
# or has none: that decides whether the batch runs the unconditional half at all.
# Seamless tiling pads the UNet's convolutions circularly for the whole call, so tiled and untiled rows (and
# rows tiled on other axes) never share one.
SHARED_SETTINGS = ("width", "height", "steps", "scheduler", "guidance_rescale", "vae", "tiling")
# Step-level batching shares only the UNet call: each task keeps its own steps, sampler, guidance rescale and VAE
# (each task decodes with its own).
STEP_SHARED_SETTINGS = ("width", "height", "tiling")


def shared_settings(spec_or_job: Any, step_level: bool = False) -> BatchKey:
    names = STEP_SHARED_SETTINGS if step_level else SHARED_SETTINGS
    return (*(getattr(spec_or_job, name) for name in names), spec_or_job.guidance_scale > 1)


def batch_key(spec: GenerationSpec, step_level: bool = False) -> BatchKey | None:
    """Tasks with equal keys can be denoised together; None: the task always runs alone (ControlNet inputs
    differ per task and their networks change the UNet's inputs)."""
    # Each img2img task brings its own image and mask, each task with references attaches its own adapter,
    # and a task whose images differ (views, variations, grid cells) batches its own images.
    if spec.control or spec.init_image is not None or spec.references or spec.views or spec.variants:
        return None
    # A whole-request batch runs the hires fix's second pass as one img2img call: a task with it runs alone.
    # Step by step, its second pass is a task of its own among those of its size.
    if spec.hires is not None and not step_level:
        return None
    loras = tuple((lora.name, lora.weight) for lora in spec.loras)
    return (spec.model, loras, *shared_settings(spec, step_level))


@dataclass(frozen=True)
class BatchPolicy:
    """`max_images`: rows of one batch (a task's images count each); 1 turns batching off.
    `max_wait_s`: how long a part-filled batch may wait for company, counted from its oldest task's arrival,
    and only while nothing else is queued. `step_level`: tasks share UNet calls step by step, whatever their
    steps and samplers, and join a running batch at its next step."""

    max_images: int = 1
    max_wait_s: float = 0.0
    step_level: bool = False

    @property
    def joins(self) -> bool:
        """Whether a queued task may join a batch that is already running."""
        return self.step_level and self.max_images > 1


NO_BATCHING = BatchPolicy()


def next_batch(queue: list[GenerationSpec], policy: BatchPolicy) -> list[int]:
    """Which queued tasks (indexes, queue order) start as one batch: the head and the tasks behind it that
    share its key, up to the image limit."""
    key = batch_key(queue[0], policy.step_level)
    chosen, images = [0], queue[0].num_images
    if key is not None:
        for index, spec in enumerate(queue[1:], start=1):
            if images >= policy.max_images:
                break
            if batch_key(spec, policy.step_level) == key and images + spec.num_images <= policy.max_images:
                chosen.append(index)
                images += spec.num_images
    return chosen


def may_join(head: GenerationSpec, running_key: BatchKey, running_images: int, policy: BatchPolicy) -> bool:
    """Whether the head of the queue joins a running step-level batch now. Only the head may: while it cannot
    (another size or LoRA set, or no room), nothing behind it joins either, so the running batch drains and
    the head's key runs next. No key waits longer than one batch's end."""
    if not policy.joins:
        return False
    key = batch_key(head, step_level=True)
    return key is not None and key == running_key and running_images + head.num_images <= policy.max_images
