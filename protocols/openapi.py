"""The OpenAPI document, generated from the same msgspec types that validate requests."""

from __future__ import annotations

from typing import Any

import msgspec

from forge import __version__
from forge.events import AnyTaskEvent
from forge.requests import GenerationRequest
from protocols.views import API, ErrorBody, TaskList, TaskView

_REF = "#/components/schemas/{name}"


def _json(name: str) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": {"$ref": _REF.format(name=name)}}}}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, **_json("ErrorBody")}


def openapi_spec() -> dict[str, Any]:
    (_, *_), components = msgspec.json.schema_components(
        [GenerationRequest, TaskView, TaskList, ErrorBody, AnyTaskEvent], ref_template=_REF
    )
    task_id = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
    task = {"description": "the generation", **_json("TaskView")}
    paths: dict[str, Any] = {
        API: {
            "post": {
                "summary": "Queue a generation",
                "description": "Answers 202 once the task is durably queued. Send an Idempotency-Key header to "
                "make retries safe: the same key returns the same task.",
                "parameters": [
                    {"name": "Idempotency-Key", "in": "header", "schema": {"type": "string", "maxLength": 255}}
                ],
                "requestBody": {"required": True, **_json("GenerationRequest")},
                "responses": {
                    "202": {"description": "queued", **_json("TaskView")},
                    "413": _error("body too large"),
                    "422": _error("invalid field"),
                    "503": _error("shutting down or queue full"),
                },
            },
            "get": {
                "summary": "List generations, newest first",
                "parameters": [
                    {"name": "state", "in": "query", "schema": {"type": "string"}},
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 100}},
                    {"name": "cursor", "in": "query", "schema": {"type": "string"}},
                ],
                "responses": {"200": {"description": "a page", **_json("TaskList")}, "422": _error("bad query")},
            },
        },
        API + "/{id}": {
            "get": {
                "summary": "State, queue position, progress, timings and image links",
                "parameters": [task_id],
                "responses": {"200": task, "404": _error("unknown id")},
            }
        },
        API + "/{id}/cancel": {
            "post": {
                "summary": "Cancel exactly this generation, queued or running",
                "parameters": [task_id],
                "responses": {"200": task, "202": task, "404": _error("unknown id"), "409": _error("already finished")},
            }
        },
        API + "/{id}/images/{index}": {
            "get": {
                "summary": "Download one image",
                "parameters": [
                    task_id,
                    {"name": "index", "in": "path", "required": True, "schema": {"type": "integer", "minimum": 0}},
                ],
                "responses": {"200": {"description": "the image (PNG, WebP or JPEG)"}, "404": _error("no such image")},
            }
        },
        API + "/{id}/events": {
            "get": {
                "summary": "WebSocket: the current state first, then queued/started/progress/... events",
                "description": "Each message is one JSON object of the TaskEvent union, tagged by `type`.",
                "parameters": [task_id],
                "responses": {"101": {"description": "switching to WebSocket"}},
            }
        },
        "/v1/info": {"get": {"summary": "Model, limits and samplers", "responses": {"200": {"description": "info"}}}},
        "/healthz": {"get": {"summary": "The process is up", "responses": {"200": {"description": "ok"}}}},
        "/readyz": {
            "get": {
                "summary": "Every engine is loaded and warm",
                "responses": {"200": {"description": "ready"}, "503": {"description": "not yet"}},
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Chara Forge",
            "version": __version__,
            "description": "Game-character images from text with SDXL.",
        },
        "paths": paths,
        "components": {"schemas": components},
    }
