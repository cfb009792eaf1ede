"""The OpenAPI document, generated from the same msgspec types that validate requests and shape responses.
It is built from the app's own routes: a route without an entry here, or an entry without a route, stops the
server at start, so the document cannot fall behind the API."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import msgspec
from starlette.routing import BaseRoute, Route, WebSocketRoute

from actors.model_catalog import ModelStatus
from forge import __version__
from forge.a1111 import A1111Request
from forge.characters import (
    Character,
    CharacterAnimationRequest,
    CharacterCreate,
    CharacterList,
    CharacterPatch,
    CharacterSheetRequest,
)
from forge.events import AnyTaskEvent
from forge.openai_images import ImageGenerationRequest
from forge.requests import GenerationRequest
from protocols.catalog_routes import (
    LoraList,
    ModelList,
    PoseList,
    PoseQuery,
    PostprocessCatalog,
    StyleList,
    UploadView,
    WildcardList,
)
from protocols.character_routes import CHARACTERS
from protocols.openapi_compat import BEARER_OR_NONE, REF, compat_operations
from protocols.sprite_sheets import SHEETS, SheetRequest, SheetView
from protocols.views import (
    API,
    ErrorBody,
    HealthView,
    InfoView,
    ListQuery,
    ReadinessView,
    TaskList,
    TaskView,
)

_SCHEMAS: list[Any] = [
    GenerationRequest,
    A1111Request,
    ImageGenerationRequest,
    TaskView,
    TaskList,
    ErrorBody,
    AnyTaskEvent,
    InfoView,
    ReadinessView,
    HealthView,
    StyleList,
    LoraList,
    PoseList,
    WildcardList,
    ModelList,
    ModelStatus,
    PostprocessCatalog,
    UploadView,
    SheetRequest,
    SheetView,
    CharacterCreate,
    CharacterPatch,
    CharacterSheetRequest,
    CharacterAnimationRequest,
    Character,
    CharacterList,
]
_QUERIES: list[Any] = [ListQuery, PoseQuery]  # their fields become query parameters, not schemas
_IMAGE_TYPES = ("image/png", "image/webp", "image/jpeg")


def _json(name: str) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": {"$ref": REF.format(name=name)}}}}


def _ok(description: str, name: str) -> dict[str, Any]:
    return {"description": description, **_json(name)}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, **_json("ErrorBody")}


def _binary(*types: str) -> dict[str, Any]:
    return {"content": {kind: {"schema": {"type": "string", "format": "binary"}} for kind in types}}


def _sheet_content() -> dict[str, Any]:
    """A sprite sheet: the atlas as PNG, or its TexturePacker JSON."""
    content = _binary("image/png")["content"]
    return {"content": {**content, "application/json": {"schema": {"type": "object"}}}}


def _animation_content() -> dict[str, Any]:
    content = {media: {"schema": {"type": "string", "format": "binary"}} for media in ("image/gif", "image/webp")}
    return {"content": {**content, "application/json": {"schema": {"type": "object"}}, "text/plain": {}}}


def _path(name: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": schema or {"type": "string"}}


def _authenticated(operation: dict[str, Any]) -> dict[str, Any]:
    """An operation that reads who is asking: with auth on, it needs a bearer token (else 401)."""
    responses = {**operation["responses"], "401": _error("auth is on and no valid bearer token was sent")}
    return {**operation, "security": BEARER_OR_NONE, "responses": responses}


def _stored(operation: dict[str, Any]) -> dict[str, Any]:
    """An operation that reads or writes the store, which in a fleet (Redis) may be out of reach for a while."""
    unreachable = "store_unavailable: the fleet's store (Redis) is unreachable (see Retry-After)"
    earlier = operation["responses"].get("503")
    description = f"{earlier['description']}; or {unreachable}" if earlier else unreachable
    return {**operation, "responses": {**operation["responses"], "503": _error(description)}}


def _admin(operation: dict[str, Any]) -> dict[str, Any]:
    responses = {
        **operation["responses"],
        "401": _error("no admin key or token was sent"),
        "403": _error("not an admin (with auth off and no FORGE_ADMIN_KEY: not a local client)"),
    }
    return {**operation, "security": BEARER_OR_NONE, "responses": responses}


def _operations(queries: dict[str, list[dict[str, Any]]]) -> dict[tuple[str, str], dict[str, Any]]:
    task_id = _path("id")
    task = _ok("the generation", "TaskView")
    unknown = _error("no such generation (or not yours)")
    model_id = _path("id", {"type": "string", "description": "a model id from GET /v1/models"})
    sheet_kind = _path("kind", {"type": "string", "enum": ["png", "json"]})
    return {
        ("post", API): _stored(
            _authenticated(
                {
                    "summary": "Queue a generation",
                    "description": "Answers 202 once the task is durably queued. Send an Idempotency-Key header to "
                    "make retries safe: the same key returns the same task.",
                    "parameters": [
                        {
                            "name": "Idempotency-Key",
                            "in": "header",
                            "schema": {"type": "string", "minLength": 1, "maxLength": 255},
                        },
                        {"name": "X-Request-Id", "in": "header", "schema": {"type": "string"}},
                    ],
                    "requestBody": {"required": True, **_json("GenerationRequest")},
                    "responses": {
                        "202": {"description": "queued", **_json("TaskView")},
                        "403": _error("the caller's plan is unknown"),
                        "404": _error("the character named is unknown (or not yours)"),
                        "409": _error("the model failed to load; an admin may load it again"),
                        "413": _error("body too large"),
                        "422": _error("invalid field (named in error.field)"),
                        "429": _error("over the plan's rate or concurrency limit (see Retry-After)"),
                        "503": _error("shutting down, queue full, or the server's disk full (see Retry-After)"),
                    },
                }
            )
        ),
        ("get", API): _authenticated(
            {
                "summary": "List generations, newest first",
                "parameters": queries["ListQuery"],
                "responses": {"200": _ok("a page", "TaskList"), "422": _error("bad query parameter")},
            }
        ),
        ("get", API + "/{id}"): _stored(
            _authenticated(
                {
                    "summary": "State, queue position, progress, timings and image links",
                    "parameters": [task_id],
                    "responses": {"200": task, "404": unknown},
                }
            )
        ),
        ("post", API + "/{id}/cancel"): _stored(
            _authenticated(
                {
                    "summary": "Cancel exactly this generation, queued or running",
                    "parameters": [task_id],
                    "responses": {
                        "200": task,
                        "202": task,
                        "404": unknown,
                        "409": _error("already finished"),
                    },
                }
            )
        ),
        ("get", API + "/{id}/images/{index}"): _stored(
            _authenticated(
                {
                    "summary": "Download one image",
                    "parameters": [task_id, _path("index", {"type": "integer", "minimum": 0})],
                    "responses": {
                        "200": {"description": "the image", **_binary(*_IMAGE_TYPES)},
                        "404": _error("no such image"),
                    },
                }
            )
        ),
        ("get", API + "/{id}/events"): _authenticated(
            {
                "summary": "WebSocket: the current state first, then queued/started/progress/... events",
                "description": "Each message is one JSON object of the TaskEvent union, tagged by `type`. An "
                "unknown id gets an error message, then close code 4404; a refused token, 4401 or 4403. In a fleet the "
                "task may run on any worker: its events come through the shared store.",
                "parameters": [task_id],
                "responses": {
                    "101": {"description": "switching to WebSocket"},
                    "426": _error("a plain GET: this endpoint speaks WebSocket only"),
                },
            }
        ),
        ("get", API + "/{id}/sprite-sheet.{kind}"): _stored(
            _authenticated(
                {
                    "summary": "A generation's sprite sheet (postprocess.sprite_sheet): the atlas image or its JSON",
                    "parameters": [task_id, sheet_kind],
                    "responses": {
                        "200": {"description": "the sheet", **_sheet_content()},
                        "404": _error("no such generation, or it has no sprite sheet"),
                    },
                }
            )
        ),
        ("get", API + "/{id}/animation/{name}"): _stored(
            _authenticated(
                {
                    "summary": "A file of a generation's animation (the animation field)",
                    "description": "animation-DIRECTION.gif or .webp (s, w, n, e, sw, nw, ne, se), "
                    "animation.aseprite.json (Aseprite's JSON export of the sprite sheet, a tag per direction) or "
                    "animation.tres (a Godot 4 SpriteFrames resource; keep it beside sprite-sheet.png).",
                    "parameters": [task_id, _path("name")],
                    "responses": {
                        "200": {"description": "the file", **_animation_content()},
                        "404": _error("no such generation, or it has no such file"),
                    },
                }
            )
        ),
        ("get", API + "/{id}/grid.png"): _stored(
            _authenticated(
                {
                    "summary": "A prompt matrix's labelled grid image (the grid field)",
                    "parameters": [task_id],
                    "responses": {
                        "200": {"description": "the grid", **_binary("image/png")},
                        "404": _error("no such generation, or it has no grid"),
                    },
                }
            )
        ),
        ("get", API + "/{id}/tile-previews/{index}.png"): _stored(
            _authenticated(
                {
                    "summary": "A seamless tile repeated along its tiled axes (3x3 for both; tile_preview)",
                    "parameters": [task_id, _path("index", {"type": "integer", "minimum": 0})],
                    "responses": {
                        "200": {"description": "the preview", **_binary("image/png")},
                        "404": _error("no such generation, or it has no such preview"),
                    },
                }
            )
        ),
        ("post", SHEETS): _stored(
            _authenticated(
                {
                    "summary": "Pack every image of finished generations, in order, into one sprite sheet",
                    "requestBody": {"required": True, **_json("SheetRequest")},
                    "responses": {
                        "201": _ok("the sheet's links and frame names", "SheetView"),
                        "503": _error("the server's disk is full"),
                        "404": _error("a generation is unknown"),
                        "409": _error("a generation has not succeeded"),
                        "413": _error("body too large"),
                        "422": _error("invalid field"),
                    },
                }
            )
        ),
        ("get", SHEETS + "/{id}.{kind}"): _stored(
            _authenticated(
                {
                    "summary": "A packed sprite sheet: the atlas image or its JSON",
                    "parameters": [_path("id"), sheet_kind],
                    "responses": {
                        "200": {"description": "the sheet", **_sheet_content()},
                        "404": _error("no such sheet"),
                    },
                }
            )
        ),
        ("get", CHARACTERS): _stored(
            _authenticated(
                {
                    "summary": "Your characters (an admin's: everyone's)",
                    "responses": {"200": _ok("the characters", "CharacterList")},
                }
            )
        ),
        ("post", CHARACTERS): _stored(
            _authenticated(
                {
                    "summary": "Make a character: a name, a description woven into its prompts, references, defaults",
                    "requestBody": {"required": True, **_json("CharacterCreate")},
                    "responses": {
                        "201": _ok("the character, version 1", "Character"),
                        "409": _error("you have a character of that name"),
                        "413": _error("body or a reference image too large"),
                        "422": _error("invalid field (a reference that is not an image names it)"),
                    },
                }
            )
        ),
        ("get", CHARACTERS + "/{id}"): _stored(
            _authenticated(
                {
                    "summary": "A character",
                    "parameters": [_path("id")],
                    "responses": {
                        "200": _ok("the character", "Character"),
                        "404": _error("no such character (or not yours)"),
                    },
                }
            )
        ),
        ("patch", CHARACTERS + "/{id}"): _stored(
            _authenticated(
                {
                    "summary": "Change a character; each change makes a new version",
                    "parameters": [_path("id")],
                    "requestBody": {"required": True, **_json("CharacterPatch")},
                    "responses": {
                        "200": _ok("the character, its version one higher", "Character"),
                        "404": _error("no such character (or not yours)"),
                        "409": _error("the new name is taken, or it changed meanwhile"),
                        "413": _error("body too large"),
                        "422": _error("invalid field"),
                    },
                }
            )
        ),
        ("post", CHARACTERS + "/{id}/animations"): _stored(
            _authenticated(
                {
                    "summary": "An animation cycle of the character: an action in 1, 4 or 8 directions, as one task",
                    "description": "A frame per pose and direction, all from one seed with the character's "
                    "description and references; the task adds a sprite sheet (a row per direction), an animation "
                    "per direction, and Aseprite and Godot atlases. Answers 202 like POST /v1/generations.",
                    "parameters": [_path("id")],
                    "requestBody": {"required": True, **_json("CharacterAnimationRequest")},
                    "responses": {
                        "202": {"description": "queued", **_json("TaskView")},
                        "404": _error("no such character (or not yours)"),
                        "413": _error("body too large"),
                        "422": _error("invalid field (an unknown action names animation.action)"),
                        "429": _error("over the plan's rate or concurrency limit (see Retry-After)"),
                        "503": _error("shutting down, queue full, or the server's disk full (see Retry-After)"),
                    },
                }
            )
        ),
        ("post", CHARACTERS + "/{id}/sheets"): _stored(
            _authenticated(
                {
                    "summary": "A sheet of the character: a turnaround, its expressions or poses, as one task",
                    "description": "One image per view, all from one seed with the character's description and "
                    "references, packed into the task's sprite sheet too (frames named by view). Answers 202 like "
                    "POST /v1/generations; follow the task the same way.",
                    "parameters": [_path("id")],
                    "requestBody": {"required": True, **_json("CharacterSheetRequest")},
                    "responses": {
                        "202": {"description": "queued", **_json("TaskView")},
                        "404": _error("no such character (or not yours)"),
                        "413": _error("body too large"),
                        "422": _error("invalid field (a pose template that is unknown names views[n].pose)"),
                        "429": _error("over the plan's rate or concurrency limit (see Retry-After)"),
                        "503": _error("shutting down, queue full, or the server's disk full (see Retry-After)"),
                    },
                }
            )
        ),
        ("delete", CHARACTERS + "/{id}"): _stored(
            _authenticated(
                {
                    "summary": "Delete a character (generations that used it keep their record of it)",
                    "parameters": [_path("id")],
                    "responses": {"204": {"description": "deleted"}, "404": _error("no such character (or not yours)")},
                }
            )
        ),
        ("post", "/v1/uploads"): _authenticated(
            {
                "summary": "Upload a control image; its id goes in control.image",
                "requestBody": {"required": True, **_binary(*_IMAGE_TYPES)},
                "responses": {
                    "201": _ok("stored", "UploadView"),
                    "503": _error("the server's disk is full"),
                    "413": _error("body too large"),
                    "422": _error("not an image, or too large in pixels"),
                },
            }
        ),
        ("get", "/v1/styles"): _authenticated(
            {
                "summary": "Styles, with whether what each needs (LoRAs, ControlNet, upscaler) is installed",
                "responses": {"200": _ok("the styles", "StyleList")},
            }
        ),
        ("get", "/v1/loras"): _authenticated(
            {
                "summary": "LoRA files installed for requests' `loras`",
                "responses": {"200": _ok("the LoRAs", "LoraList")},
            }
        ),
        ("get", "/v1/poses"): _authenticated(
            {
                "summary": "Pose templates for openpose control (control.pose)",
                "responses": {"200": _ok("the poses", "PoseList")},
            }
        ),
        ("get", "/v1/wildcards"): _authenticated(
            {
                "summary": "Wildcard files prompts may name as __name__ (prompt variations)",
                "responses": {"200": _ok("the wildcards", "WildcardList")},
            }
        ),
        ("get", "/v1/poses/{name}.png"): _authenticated(
            {
                "summary": "A pose template drawn as an OpenPose skeleton",
                "parameters": [_path("name"), *queries["PoseQuery"]],
                "responses": {
                    "200": {"description": "the skeleton", **_binary("image/png")},
                    "404": _error("no such pose"),
                    "422": _error("bad size"),
                },
            }
        ),
        ("get", "/v1/postprocess"): _authenticated(
            {
                "summary": "Installed upscalers and background models, and the pixel-art palettes",
                "responses": {"200": _ok("what post-processing can use", "PostprocessCatalog")},
            }
        ),
        ("get", "/v1/models"): _authenticated(
            {
                "summary": "Models in the catalog, and where each is loaded",
                "responses": {"200": _ok("the models", "ModelList")},
            }
        ),
        ("get", "/v1/models/{id}"): _authenticated(
            {
                "summary": "One model's state",
                "parameters": [model_id],
                "responses": {"200": _ok("the model", "ModelStatus"), "404": _error("no such model")},
            }
        ),
        ("post", "/v1/models/{id}/load"): _admin(
            {
                "summary": "Load a model on every engine (admin)",
                "parameters": [model_id],
                "responses": {
                    "200": _ok("loaded", "ModelStatus"),
                    "404": _error("no such model"),
                    "409": _error("its weights failed to load"),
                },
            }
        ),
        ("post", "/v1/models/{id}/unload"): _admin(
            {
                "summary": "Unload a model from every engine (admin)",
                "parameters": [model_id],
                "responses": {
                    "200": _ok("unloaded", "ModelStatus"),
                    "404": _error("no such model"),
                    "409": _error("the default model stays loaded"),
                },
            }
        ),
        ("get", "/v1/info"): _authenticated(
            {
                "summary": "Version, model limits, samplers and engines",
                "responses": {"200": _ok("info", "InfoView")},
            }
        ),
        ("get", "/healthz"): {
            "summary": "The process is up",
            "responses": {"200": _ok("ok", "HealthView")},
        },
        ("get", "/readyz"): {
            "summary": "Every engine is loaded and warm, and new work is accepted",
            "responses": {
                "200": _ok("ready", "ReadinessView"),
                "503": _ok(
                    "not yet, shutting down, work waiting for disk space, or the store unreachable", "ReadinessView"
                ),
            },
        },
        ("get", "/metrics"): {
            "summary": "Prometheus metrics",
            "description": "Open to anyone unless the server sets metrics_token, which a scrape then sends as its "
            "bearer token (API keys and JWTs do not count here).",
            "security": BEARER_OR_NONE,
            "responses": {
                "200": {"description": "text exposition format", "content": {"text/plain": {}}},
                "401": _error("metrics_token is set and no bearer token was sent"),
                "403": _error("not the metrics token"),
            },
        },
        ("get", "/openapi.json"): {
            "summary": "This document",
            "responses": {"200": {"description": "OpenAPI 3.1", "content": {"application/json": {}}}},
        },
        ("get", "/docs"): {
            "summary": "This document as a page",
            "responses": {"200": {"description": "HTML", "content": {"text/html": {}}}},
        },
    }


def served_operations(routes: Iterable[BaseRoute]) -> set[tuple[str, str]]:
    """(method, path) for each operation the routes serve, in OpenAPI's path syntax ({index:int} → {index}).
    A WebSocket route counts as the GET that opens it."""
    served = set()
    for route in routes:
        path = re.sub(r"\{(\w+):\w+\}", r"{\1}", getattr(route, "path", ""))
        if isinstance(route, WebSocketRoute):
            served.add(("get", path))
        elif isinstance(route, Route):
            served |= {(method.lower(), path) for method in route.methods or () if method != "HEAD"}
    return served


def _query_parameters(schemas: dict[str, Any], struct: str) -> list[dict[str, Any]]:
    """A query struct's fields as parameters, with the constraints its decoder enforces."""
    schema = schemas.pop(struct)
    required = set(schema.get("required", ()))
    return [
        {"name": name, "in": "query", "required": name in required, "schema": field}
        for name, field in schema["properties"].items()
    ]


def openapi_spec(routes: Iterable[BaseRoute]) -> dict[str, Any]:
    (_, *_), schemas = msgspec.json.schema_components([*_SCHEMAS, *_QUERIES], ref_template=REF)
    queries = {struct.__name__: _query_parameters(schemas, struct.__name__) for struct in _QUERIES}
    operations = _operations(queries) | compat_operations()
    served = served_operations(routes)
    if served != set(operations):
        raise RuntimeError(
            f"the API document and the routes disagree: undocumented {sorted(served - set(operations))}, "
            f"documented but not served {sorted(set(operations) - served)}"
        )
    paths: dict[str, dict[str, Any]] = {}
    for (method, path), operation in operations.items():
        paths.setdefault(path, {})[method] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Chara Forge",
            "version": __version__,
            "description": "Game-character images from text with SDXL. Errors are JSON: "
            "{error: {code, message, field, rule}}, where field names what to fix.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "an API key or a JWT; needed only when the server runs with auth on",
                },
                "basic": {
                    "type": "http",
                    "scheme": "basic",
                    "description": "owner and API key, as AUTOMATIC1111 clients send them (/sdapi/v1 only)",
                },
            },
        },
    }
