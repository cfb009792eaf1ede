"""The contract between engine actors and the synchronous backends in `engines/`."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

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
    """Set from the event loop, read by the worker thread between denoising steps."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""

    def set(self, reason: str) -> None:
        self.reason = reason
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()


@dataclass(frozen=True, kw_only=True)
class Job:
    prompt: str
    negative_prompt: str
    width: int
    height: int
    seeds: list[int]
    steps: int
    guidance_scale: float
    scheduler: str
    preview_every: int = 0
    preview_size: int = 128
    on_progress: ProgressFn | None = None
    cancel: CancelFlag = field(default_factory=CancelFlag)


def job_for(
    spec: GenerationSpec,
    *,
    preview_every: int = 0,
    preview_size: int = 128,
    on_progress: ProgressFn | None = None,
    cancel: CancelFlag | None = None,
) -> Job:
    """The engine's view of a resolved request."""
    return Job(
        prompt=spec.prompt,
        negative_prompt=spec.negative_prompt,
        width=spec.width,
        height=spec.height,
        seeds=spec.seeds,
        steps=spec.steps,
        guidance_scale=spec.guidance_scale,
        scheduler=spec.scheduler,
        preview_every=preview_every,
        preview_size=preview_size,
        on_progress=on_progress,
        cancel=cancel or CancelFlag(),
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


class Engine(Protocol):
    """A loaded pipeline on one device. Every method blocks; actors call them from a worker thread."""

    device: str

    def warm(self) -> None: ...

    def run(self, job: Job) -> GenerationResult: ...

    def close(self) -> None: ...
