"""The contract between engine actors and the synchronous backends in `engines/`."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from forge.batching import shared_settings
from forge.ip_adapters import IpAdapterSource

if TYPE_CHECKING:
    from PIL.Image import Image

    from forge.requests import GenerationSpec

ProgressFn = Callable[[int, int, "Image | None"], None]
"""Called from the worker thread after each step: (step, total, latent preview or None)."""


class JobCancelled(Exception):
    """Raised inside the denoising loop when the job's cancel flag is set."""


class OutOfMemory(Exception):
    """The device ran out of memory for this job; the engine freed what it could and stays usable."""


class CancelFlag:
    """Set from the event loop, read by the worker thread between denoising steps. Work that cannot stop
    to look (one long native call) registers a callback to be interrupted instead."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []
        self.reason = ""

    def set(self, reason: str) -> None:
        with self._lock:
            self.reason = reason
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()

    def is_set(self) -> bool:
        return self._event.is_set()

    def raise_if_set(self) -> None:
        if self._event.is_set():
            raise JobCancelled

    @contextmanager
    def interrupting(self, callback: Callable[[], None]) -> Iterator[None]:
        """Within the block, setting the flag calls `callback` (at once when it is set already)."""
        with self._lock:
            pending = not self._event.is_set()
            if pending:
                self._callbacks.append(callback)
        if not pending:
            callback()
        try:
            yield
        finally:
            with self._lock, suppress(ValueError):
                self._callbacks.remove(callback)


@dataclass(frozen=True, kw_only=True)
class LoraWeight:
    name: str
    path: str
    weight: float


@dataclass(frozen=True, kw_only=True)
class ControlJob:
    """One ControlNet's input. `image` is a file (an upload) or None with `pose` set (a template to draw)."""

    type: str
    image: str | None
    pose: str | None
    preprocess: bool
    strength: float
    start: float
    end: float


@dataclass(frozen=True, kw_only=True)
class Job:
    model: ModelInfo
    prompt: str
    negative_prompt: str
    width: int
    height: int
    seeds: list[int]
    steps: int
    guidance_scale: float
    scheduler: str
    loras: list[LoraWeight] = field(default_factory=list)
    controls: list[ControlJob] = field(default_factory=list)
    preview_every: int = 0
    preview_size: int = 128
    # Asked from the worker thread before a preview is made: previews are only for someone watching.
    wants_preview: Callable[[], bool] | None = None
    on_progress: ProgressFn | None = None
    cancel: CancelFlag = field(default_factory=CancelFlag)
    image_edit: ImageEdit | None = None  # img2img or inpainting
    references: References | None = None  # IP-Adapter reference images
    # The text encoders' layer the prompt is read from, counted from the end (1: last); None: the model's.
    clip_skip: int | None = None
    # diffusers' rescale of the guided prediction (Lin et al. 2023, for zero-SNR models); 0 leaves CFG as it is.
    guidance_rescale: float = 0.0
    vae: Vae | None = None  # a configured VAE in place of the model's own
    hires: Hires | None = None  # a second, img2img pass at a larger size
    # Seamless tiles: none, x, y or both; the UNet's and VAE's convolutions wrap around on those axes.
    tiling: str = "none"
    # A task whose images differ (a sheet's views, prompt variations, a grid's cells): a job per image, those
    # that can share a batch run as one (this job's own fields are unused).
    views: list[Job] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class Reference:
    image: str  # a file
    strength: float
    mode: str  # full | style | composition
    start: float
    end: float

    def active(self, step: int, total: int) -> bool:
        """Whether the reference acts at `step` (0-based) of `total`: within [start, end) of the steps."""
        return self.start <= step / max(total, 1) < self.end


@dataclass(frozen=True, kw_only=True)
class References:
    adapter: str
    source: IpAdapterSource
    images: list[Reference]


@dataclass(frozen=True, kw_only=True)
class Vae:
    name: str
    source: str  # a diffusers folder or one single file


@dataclass(frozen=True, kw_only=True)
class Hires:
    """The hires fix: the first pass's latents upscaled to `upscale_width` x `upscale_height` (by `upscaler`:
    "latent" interpolates the latents, "lanczos" or an upscaler model file works on the decoded image), cropped
    to `width` x `height` and repainted by `steps` img2img steps at `denoise` strength."""

    upscaler: str
    upscale_width: int
    upscale_height: int
    width: int
    height: int
    steps: int
    denoise: float


@dataclass(frozen=True, kw_only=True)
class ImageEdit:
    """Start from an image (img2img), and with a mask repaint only part of it (inpainting). Paths to files."""

    init_image: str
    strength: float
    mask: str | None = None
    mask_blur: int = 0
    inpaint_area: str = "whole"
    inpaint_padding: int = 0


def job_batch_key(job: Job) -> tuple[object, ...]:
    """Jobs with equal keys can share one UNet batch."""
    loras = tuple((lora.path, lora.weight) for lora in job.loras)
    return (job.model.id, loras, *shared_settings(job))


def views_batch_key(job: Job) -> tuple[object, ...] | None:
    """Jobs with equal keys may run as one `run_batch` (one UNet and ControlNet call a step for all their rows):
    `job_batch_key`, the ControlNets' settings (not their images), the references and the hires fix. Each job keeps
    its own prompt, seeds, guidance scale and control images. None: the job runs alone (an init image or mask)."""
    if job.image_edit is not None:
        return None
    controls = tuple((c.type, c.strength, c.start, c.end, c.preprocess) for c in job.controls)
    references = job.references
    shared = None if references is None else (references.adapter, references.source, tuple(references.images))
    return (*job_batch_key(job), controls, shared, job.hires)


def job_for(
    spec: GenerationSpec,
    model: ModelInfo,
    *,
    loras: list[LoraWeight] | None = None,
    controls: list[ControlJob] | None = None,
    preview_every: int = 0,
    preview_size: int = 128,
    wants_preview: Callable[[], bool] | None = None,
    on_progress: ProgressFn | None = None,
    cancel: CancelFlag | None = None,
    image_edit: ImageEdit | None = None,
    references: References | None = None,
    vae: Vae | None = None,
    hires: Hires | None = None,
) -> Job:
    """The engine's view of a resolved request."""
    return Job(
        model=model,
        prompt=spec.styled_prompt,
        negative_prompt=spec.styled_negative_prompt,
        width=spec.width,
        height=spec.height,
        seeds=spec.seeds,
        steps=spec.steps,
        guidance_scale=spec.guidance_scale,
        scheduler=spec.scheduler,
        loras=loras or [],
        controls=controls or [],
        preview_every=preview_every,
        preview_size=preview_size,
        wants_preview=wants_preview,
        on_progress=on_progress,
        cancel=cancel or CancelFlag(),
        image_edit=image_edit,
        references=references,
        clip_skip=spec.clip_skip,
        guidance_rescale=spec.guidance_rescale,
        vae=vae,
        hires=hires,
        tiling=spec.tiling,
    )


@dataclass(frozen=True, kw_only=True)
class GenerationResult:
    images: list[Image]
    denoise_s: float


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    """Which model an engine loads and the request bounds that follow from it."""

    name: str
    path: str
    is_tiny: bool
    default_size: int
    default_steps: int
    default_guidance: float
    min_size: int
    max_size: int
    variant: str | None = None
    id: str = ""
    # "single_file": `path` is one checkpoint file and `config` the diffusers folder that describes it.
    format: str = "diffusers"
    config: str | None = None
    # ControlNet type -> a diffusers folder or hub repo id made for this model's architecture.
    controlnets: dict[str, str] = field(default_factory=dict)
    depth_model: str | None = None
    # An inpainting UNet (9 input channels): a diffusers folder or hub repo with it in unet/.
    inpainting: str | None = None
    # IP-Adapter name -> where it comes from; the first is used when a request names none.
    ip_adapters: dict[str, IpAdapterSource] = field(default_factory=dict)
    # Clip skip when a request names none: SDXL's conditioning is its encoders' penultimate layer (2).
    clip_skip: int = 2
    # Textual-inversion embeddings (<data_dir>/embeddings): a folder of <name>.safetensors with clip_l and clip_g.
    embeddings_dir: str | None = None
    # The model family: "epsilon" or "v" (v-prediction), and zero terminal SNR; every sampler follows them.
    prediction: str = "epsilon"
    zero_snr: bool = False
    guidance_rescale: float = 0.0  # the default of requests that name none
    vae: str | None = None  # the VAE (a name in `vaes`) requests get when they name none; None: its own
    vaes: dict[str, str] = field(default_factory=dict)  # every configured VAE: name -> source
    upscalers_dir: str | None = None  # where the hires fix finds upscaler model files


class ModelLoadError(Exception):
    """A model's weights could not be loaded (missing, corrupt or truncated); `file` names the culprit."""

    def __init__(self, model_id: str, message: str, file: str | None = None) -> None:
        super().__init__(message)
        self.model_id = model_id
        self.file = file


class AssetError(Exception):
    """Something a task needs besides its base model could not be used (a LoRA, a ControlNet, a control
    image, a post-processing model); the task fails, the engine and the model stay.

    `code` is the task's error code (`lora_invalid`, `controlnet_unavailable`, `control_invalid`,
    `postprocess_model_missing`, ...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class Engine(Protocol):
    """A loaded pipeline on one device. Every method blocks; actors call them from a worker thread."""

    device: str

    def warm(self) -> None: ...

    def run(self, job: Job) -> GenerationResult:
        """One job alone; raises JobCancelled when its flag is set before or during the run."""
        ...

    def run_batch(self, jobs: Sequence[Job]) -> list[GenerationResult]:
        """Jobs that share a batch key, denoised together: one result per job, in order, each the images its
        own seeds give alone. Raises JobCancelled only when every job's flag is set; a job cancelled while
        the others go on still gets a result, which the caller discards."""
        ...

    def run_steps(
        self,
        jobs: Sequence[Job],
        on_done: Callable[[Job, GenerationResult | BaseException], None],
        joiners: Callable[[int], list[Job]],
        max_images: int,
        on_step: Callable[[int], None] | None = None,
    ) -> None:
        """Step-level batching: `jobs`, and those `joiners` hands over between steps (given the room left, in
        images), denoised together step by step; each ends through `on_done` once, as soon as it is done.
        `on_step` hears how many images each step's UNet call denoises."""
        ...

    def memory_bytes(self) -> int: ...

    def close(self) -> None: ...
