"""The API document's part for the AUTOMATIC1111 (/sdapi/v1) and OpenAI Images (/openai/v1) adapters."""

from __future__ import annotations

from typing import Any

from protocols.a1111_routes import SDAPI
from protocols.openai_routes import OPENAI

REF = "#/components/schemas/{name}"  # where the document keeps its schemas (shared with protocols.openapi)
_BEARER_BASIC_OR_NONE: list[dict[str, list[str]]] = [{"bearer": []}, {"basic": []}, {}]
# Bearer or nothing: a token is needed only when the server runs with auth on.
BEARER_OR_NONE: list[dict[str, list[str]]] = [{"bearer": []}, {}]
_ANY_OBJECT = {"type": "object"}
_ARRAY_OF_OBJECTS = {"type": "array", "items": {"type": "object"}}
_NULL = {"type": "null"}
_A1111_ANSWER = {
    "type": "object",
    "required": ["images", "parameters", "info"],
    "properties": {
        "images": {"type": "array", "items": {"type": "string", "description": "a PNG in base64, no data: prefix"}},
        "parameters": {"type": "object", "description": "the request, echoed"},
        "info": {"type": "string", "description": "JSON: prompt, seeds, sizes, infotexts, task_ids, warnings, ..."},
    },
}
_OPENAI_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
_OPENAI_IMAGES = {
    "type": "object",
    "required": ["created", "data"],
    "properties": {
        "created": {"type": "integer"},
        "data": {"type": "array", "items": {"type": "object"}},
        "size": {"type": "string"},
        "output_format": {"type": "string"},
    },
}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, **_json({"$ref": REF.format(name="ErrorBody")})}


def _openai_error(description: str) -> dict[str, Any]:
    return {"description": description, **_json(_OPENAI_ERROR)}


def _a1111(summary: str, answer: dict[str, Any], **extra: Any) -> dict[str, Any]:
    responses = {
        "200": {"description": "as AUTOMATIC1111 answers", **_json(answer)},
        "401": _error("auth is on and no valid bearer token or Basic owner:key was sent"),
        "503": _error("store_unavailable: the fleet's store (Redis) is unreachable (see Retry-After)"),
        **extra.pop("responses", {}),
    }
    return {"summary": summary, "tags": ["AUTOMATIC1111"], "security": _BEARER_BASIC_OR_NONE,
            "responses": responses, **extra}  # fmt: skip


def _generation(summary: str) -> dict[str, Any]:
    return _a1111(
        summary,
        _A1111_ANSWER,
        description="Answers once every image exists (n_iter tasks of batch_size images, seeds seed, seed+1, "
        "...). Unknown fields are ignored; an unknown sampler, scheduler, model, style, LoRA or ControlNet "
        "model is a 422 naming the A1111 field. A task that fails answers 500 with its error code.",
        requestBody={"required": True, **_json({"$ref": REF.format(name="A1111Request")})},
        responses={
            "403": _error("the caller's plan is unknown"),
            "413": _error("body too large"),
            "422": _error("invalid field (named in error.field, as A1111 names it)"),
            "429": _error("over the plan's rate or concurrency limit (see Retry-After)"),
            "500": _error("the generation failed (error.code says why)"),
            "503": _error("shutting down, queue full, disk full, or the store unreachable (see Retry-After)"),
        },
    )


def _openai(summary: str, **extra: Any) -> dict[str, Any]:
    responses = {
        "200": {"description": "OpenAI's answer", **_json(_OPENAI_IMAGES)},
        "400": _openai_error("invalid field (error.param names it); x-should-retry: false"),
        "401": _openai_error("auth is on and no valid API key was sent"),
        "403": _openai_error("the caller's plan is unknown"),
        "404": _openai_error("a character or upload named is unknown"),
        "409": _openai_error("the model failed to load"),
        "413": _openai_error("body too large"),
        "429": _openai_error("over the plan's rate or concurrency limit (see Retry-After)"),
        "500": _openai_error("the generation failed"),
        "503": _openai_error("shutting down, queue full, disk full, or the store unreachable (see Retry-After)"),
    }
    responses["200"]["content"]["text/event-stream"] = {
        "schema": {"type": "string", "description": "with stream: partial_image events, then completed ones"}
    }
    parameters = [{"name": "Idempotency-Key", "in": "header", "schema": {"type": "string", "maxLength": 255}}]
    return {"summary": summary, "tags": ["OpenAI Images"], "security": BEARER_OR_NONE, "parameters": parameters,
            "responses": responses, **extra}  # fmt: skip


def compat_operations() -> dict[tuple[str, str], dict[str, Any]]:
    lists: dict[str, tuple[str, dict[str, Any]]] = {
        "/sd-models": ("Models, each with the title /options and override_settings name", _ARRAY_OF_OBJECTS),
        "/samplers": ("Samplers, by A1111's names", _ARRAY_OF_OBJECTS),
        "/schedulers": ("Schedules (automatic, karras, uniform)", _ARRAY_OF_OBJECTS),
        "/upscalers": ("Upscalers hires fix may name", _ARRAY_OF_OBJECTS),
        "/latent-upscale-modes": ("Latent: hires fix interpolates the latents (bilinear)", _ARRAY_OF_OBJECTS),
        "/sd-vae": ("The configured VAEs, for sd_vae (Automatic: each model's default)", _ARRAY_OF_OBJECTS),
        "/loras": ("Installed LoRAs, for <lora:name:weight> in prompts", _ARRAY_OF_OBJECTS),
        "/embeddings": ("Textual-inversion embeddings prompts may name: loaded and skipped", _ANY_OBJECT),
        "/prompt-styles": ("Styles, for the styles field", _ARRAY_OF_OBJECTS),
        "/scripts": ("Always-on scripts (ControlNet)", _ANY_OBJECT),
        "/cmd-flags": ("Flags, as far as they apply", _ANY_OBJECT),
        "/options": ("Options; sd_model_checkpoint is the caller's model", _ANY_OBJECT),
        "/progress": ("The caller's newest running task, as A1111's one job", _ANY_OBJECT),
    }
    operations = {("get", SDAPI + path): _a1111(summary, answer) for path, (summary, answer) in lists.items()}
    operations |= {
        ("post", SDAPI + "/txt2img"): _generation("Generate images, as A1111's txt2img"),
        ("post", SDAPI + "/img2img"): _generation("img2img and inpainting, as A1111's img2img"),
        ("post", SDAPI + "/options"): _a1111(
            "Set options: sd_model_checkpoint, sd_vae and CLIP_stop_at_last_layers are the caller's own (not "
            "everyone's); others are accepted",
            _NULL,
            requestBody={"required": True, **_json(_ANY_OBJECT)},
            responses={
                "413": _error("body too large"),
                "422": _error("an unknown model title or VAE, a clip skip outside 1-12"),
            },
        ),
        ("post", SDAPI + "/interrupt"): _a1111("Cancel the caller's running tasks (never another's)", _NULL),
        ("post", SDAPI + "/skip"): _a1111("As interrupt: cancel the caller's running tasks", _NULL),
        ("post", SDAPI + "/refresh-checkpoints"): _a1111("Nothing to do: models come from the config", _NULL),
        ("post", SDAPI + "/png-info"): _a1111(
            "The infotext in an image and its parameters, as A1111 parses them",
            _ANY_OBJECT,
            requestBody={"required": True, **_json(_ANY_OBJECT)},
            responses={"413": _error("body too large"), "422": _error("no image, or one that cannot be read")},
        ),
        ("post", OPENAI + "/images/generations"): _openai(
            "Generate images, as OpenAI's Images API",
            description="quality sets the steps (low: half the model's default, medium/standard/auto: the "
            "default, high/hd: one and a half times); model is one of ours or means the default; background "
            "transparent removes the background; stream sends partial images from the previews.",
            requestBody={"required": True, **_json({"$ref": REF.format(name="ImageGenerationRequest")})},
        ),
        ("post", OPENAI + "/images/edits"): _openai(
            "Edit an image: inpainting where the mask is transparent, else img2img; more images are references",
            requestBody={
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "required": ["image", "prompt"],
                            "properties": {
                                "image": {"type": "string", "format": "binary"},
                                "mask": {"type": "string", "format": "binary"},
                                "prompt": {"type": "string", "minLength": 1},
                                "n": {"type": "integer", "minimum": 1, "maximum": 8},
                                "size": {"type": "string", "pattern": "^(auto|[0-9]{2,4}x[0-9]{2,4})$"},
                                "response_format": {"type": "string", "enum": ["b64_json", "url"]},
                            },
                        }
                    }
                },
            },
        ),
        ("get", OPENAI + "/models"): {
            "summary": "Models, in OpenAI's list shape",
            "tags": ["OpenAI Images"],
            "security": BEARER_OR_NONE,
            "responses": {
                "200": {"description": "the list", **_json(_ANY_OBJECT)},
                "401": _openai_error("auth is on and no valid API key was sent"),
                "503": _openai_error("the store is unreachable"),
            },
        },
    }
    return operations
