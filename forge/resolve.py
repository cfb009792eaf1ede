"""Turn a validated request into a complete spec: the model's defaults, and the limits that depend on it."""

from __future__ import annotations

import secrets

from forge.engine import ModelInfo
from forge.errors import InvalidRequest
from forge.requests import MAX_SEED, GenerationRequest, GenerationSpec, SchedulerName

DEFAULT_SCHEDULER: SchedulerName = "euler"
KNOWN_STYLES = ("none",)


SIZE_PRESETS = ("square", "portrait", "landscape")


def _round8(value: float) -> int:
    return max(8, round(value / 8) * 8)


def preset_size(model: ModelInfo, preset: str) -> tuple[int, int] | None:
    """(width, height) for a named preset at the model's native area (SDXL: 832x1216 portrait)."""
    side = model.default_size
    long, short = _round8(side * 1.1875), _round8(side * 0.8125)
    sizes = {"square": (side, side), "portrait": (short, long), "landscape": (long, short)}
    if preset not in sizes:
        return None
    width, height = sizes[preset]
    return max(width, model.min_size), max(height, model.min_size)


def resolve_request(request: GenerationRequest, model: ModelInfo, *, max_prompt_chars: int) -> GenerationSpec:
    if not request.prompt.strip():
        raise InvalidRequest("prompt must not be blank", field="prompt", rule="min_length")
    for field, text in (("prompt", request.prompt), ("negative_prompt", request.negative_prompt)):
        if len(text) > max_prompt_chars:
            raise InvalidRequest(
                f"{field} is longer than {max_prompt_chars} characters", field=field, rule="max_length"
            )
    if request.style is not None and request.style not in KNOWN_STYLES:
        raise InvalidRequest(
            f"unknown style {request.style!r}; known styles: {', '.join(KNOWN_STYLES)}",
            field="style",
            rule="unknown_style",
        )
    width = request.width or model.default_size
    height = request.height or model.default_size
    for field, side in (("width", width), ("height", height)):
        if not model.min_size <= side <= model.max_size:
            raise InvalidRequest(
                f"{field} must be between {model.min_size} and {model.max_size} for {model.name}",
                field=field,
                rule="range",
            )
    return GenerationSpec(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        style=request.style,
        width=width,
        height=height,
        num_images=request.num_images,
        steps=request.steps or model.default_steps,
        guidance_scale=model.default_guidance if request.guidance_scale is None else request.guidance_scale,
        seed=secrets.randbelow(MAX_SEED + 1) if request.seed is None else request.seed,
        scheduler=request.scheduler or DEFAULT_SCHEDULER,
        output_format=request.output_format,
        priority=request.priority,
        model=model.name,
    )
