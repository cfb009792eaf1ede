"""What a client may ask for (validated where bytes come in) and the fully resolved spec that is stored."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

SchedulerName = Literal["euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "unipc", "ddim"]
OutputFormat = Literal["png", "webp", "jpeg"]

MAX_SEED = 2**32 - 1
# Hard ceilings; the configured and per-model bounds are checked by ingress.
Side = Annotated[int, Meta(ge=8, le=4096, multiple_of=8, description="pixels, a multiple of 8")]


class GenerationRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A request to generate character images. Omitted fields take the model's defaults."""

    prompt: Annotated[str, Meta(min_length=1, max_length=100_000, description="what to draw")]
    negative_prompt: Annotated[str, Meta(max_length=100_000, description="what to avoid")] = ""
    style: Annotated[str, Meta(min_length=1, max_length=64)] | None = None
    width: Side | None = None
    height: Side | None = None
    num_images: Annotated[int, Meta(ge=1, le=8, description="images from one prompt")] = 1
    steps: Annotated[int, Meta(ge=1, le=150, description="denoising steps")] | None = None
    guidance_scale: Annotated[float, Meta(ge=0, le=30, description="classifier-free guidance")] | None = None
    seed: Annotated[int, Meta(ge=0, le=MAX_SEED, description="random when absent; image k uses seed+k")] | None = None
    scheduler: SchedulerName | None = None
    output_format: OutputFormat = "png"
    priority: Annotated[int, Meta(ge=-10, le=10, description="higher runs first")] = 0


class GenerationSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A request with every default filled in: exactly what the engine runs and what metadata records."""

    prompt: str
    negative_prompt: str
    style: str | None
    width: int
    height: int
    num_images: int
    steps: int
    guidance_scale: float
    seed: int
    scheduler: SchedulerName
    output_format: OutputFormat
    priority: int
    model: str

    @property
    def seeds(self) -> list[int]:
        return [(self.seed + k) % (MAX_SEED + 1) for k in range(self.num_images)]
