"""OpenAI's Images API requests, and what they mean here: ordinary generation requests.

`model` names one of ours, or anything else (gpt-image-1, dall-e-3) for the default. `quality` sets the
steps as a share of the model's default; `style` is one of ours, with OpenAI's vivid and natural mapped to
two of them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from forge.engine import ModelInfo
from forge.errors import InvalidRequest

# Steps as a share of the model's default (SDXL: 15, 30, 45).
QUALITY_STEPS = {"low": 0.5, "medium": 1.0, "standard": 1.0, "auto": 1.0, "high": 1.5, "hd": 1.5}
OPENAI_STYLES = {"vivid": "splash-art", "natural": "realistic-portrait"}
MAX_N = 8
EDIT_STRENGTH = 0.8  # an edit without a mask repaints this much of the image


class ImageGenerationRequest(msgspec.Struct, kw_only=True):
    """POST /images/generations (and the form fields of /images/edits). Unknown fields are ignored."""

    prompt: Annotated[str, Meta(min_length=1, max_length=32000)]
    model: str | None = None
    n: Annotated[int, Meta(ge=1, le=MAX_N, description="images (OpenAI allows 10; this server 8)")] = 1
    size: Annotated[str, Meta(pattern=r"^(auto|[0-9]{2,4}x[0-9]{2,4})$", description="WIDTHxHEIGHT or auto")] = "auto"
    quality: Literal["low", "medium", "high", "standard", "hd", "auto"] = "auto"
    response_format: Literal["b64_json", "url"] = "b64_json"
    output_format: Literal["png", "webp", "jpeg"] = "png"
    output_compression: Annotated[int, Meta(ge=0, le=100)] | None = None
    background: Literal["transparent", "opaque", "auto"] = "auto"
    style: str | None = None
    user: str | None = None
    stream: bool = False
    partial_images: Annotated[int, Meta(ge=0, le=3)] = 0


def generation_fields(given: ImageGenerationRequest, model: ModelInfo) -> dict[str, Any]:
    """Our request's fields. `model`: the request's when it is one of ours, else the default."""
    fields: dict[str, Any] = {
        "prompt": given.prompt,
        "num_images": given.n,
        "output_format": given.output_format,
        "steps": max(1, round(model.default_steps * QUALITY_STEPS[given.quality])),
    }
    if given.model == model.id:  # one of ours; an unknown name (dall-e-3, say) gets the default unnamed
        fields["model"] = model.id
    if given.size != "auto":
        sides = [int(side) for side in given.size.split("x")]
        if any(side % 8 or not model.min_size <= side <= model.max_size for side in sides):
            # Never a silently different size: the image would not be what the caller laid out for.
            raise InvalidRequest(
                f"size {given.size}: each side must be a multiple of 8 from {model.min_size} to {model.max_size}",
                field="size",
                rule="invalid",
            )
        fields["width"], fields["height"] = sides
    if given.style:
        fields["style"] = OPENAI_STYLES.get(given.style, given.style)
    postprocess: dict[str, Any] = {}
    if given.background == "transparent":
        if given.output_format == "jpeg":
            raise InvalidRequest("a transparent background needs png or webp", field="background", rule="invalid")
        postprocess["remove_background"] = True
    if given.output_compression is not None and given.output_format != "png":
        postprocess["quality"] = max(1, given.output_compression)
    if postprocess:
        fields["postprocess"] = postprocess
    return fields
