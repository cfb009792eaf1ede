"""OpenAI's Images API at `/openai/v1` (a client sets its base_url there; our own /v1 stays as it is).

Generations and edits are ordinary tasks published through ingress. Errors take OpenAI's shape with the
status the SDK decides its retries by, and `x-should-retry: false` where a retry would only repeat a
refusal. The SDK's own retries send the same Idempotency-Key, which makes them the same task.
"""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.to_thread
from PIL import Image
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from actors.encoding import mask_as_ours
from actors.files import Files
from actors.hub import Events
from actors.ingress import Ingress
from forge.auth import Authenticator, Principal
from forge.errors import ForgeError, InvalidRequest, PayloadTooLarge
from forge.events import Progress
from forge.openai_images import EDIT_STRENGTH, ImageGenerationRequest, generation_fields
from forge.requests import GenerationRequest
from forge.tasks import TaskRecord, TaskState
from forge.validation import convert, decode_json
from protocols.http_io import JSONResponse, idempotency_key, read_body, retry_headers
from protocols.identity import principal_of
from protocols.task_wait import GenerationFailed, image_bytes, until_finished
from protocols.views import image_url

OPENAI = "/openai/v1"
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error",
               429: "rate_limit_error", 503: "server_error"}  # fmt: skip
# Refusals a retry would only repeat; 429 and 503 carry Retry-After and are worth retrying.
NO_RETRY = {400, 401, 403, 404, 409, 413, 422}

Handler = Callable[[Request], Awaitable[Response]]


def openai_error(status: int, message: str, *, code: str, param: str | None = None) -> Response:
    """OpenAI's error body; our 422 is its 400 (what the SDK raises BadRequestError for)."""
    status = 400 if status == 422 else status
    headers = {"x-should-retry": "false"} if status in NO_RETRY else {}
    body = {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param, "code": code}
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def _openai_errors(handler: Handler) -> Handler:
    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except ForgeError as exc:
            response = openai_error(exc.status, exc.message, code=exc.code, param=exc.field)
            response.headers.update(retry_headers(exc))
            return response

    return wrapped


@dataclass(frozen=True)
class OpenAIRoutes:
    ingress: Ingress
    hub: Events
    results: Files
    auth: Authenticator
    max_body_bytes: int

    def routes(self) -> list[BaseRoute]:
        return [
            Route(OPENAI + "/images/generations", _openai_errors(self.generations), methods=["POST"]),
            Route(OPENAI + "/images/edits", _openai_errors(self.edits), methods=["POST"]),
            Route(OPENAI + "/models", _openai_errors(self.models), methods=["GET"]),
        ]

    async def models(self, request: Request) -> Response:
        await principal_of(request, self.auth)
        data = [{"id": model_id, "object": "model", "created": 0, "owned_by": "chara-forge"}
                for model_id in self.ingress.catalog.ids()]  # fmt: skip
        return JSONResponse({"object": "list", "data": data})

    async def generations(self, request: Request) -> Response:
        principal = await principal_of(request, self.auth)
        given = decode_json(await read_body(request, self.max_body_bytes), ImageGenerationRequest)
        return await self._run(request, principal, given, {})

    async def edits(self, request: Request) -> Response:
        """multipart: image (or image[]: the first is edited, the others are references), an optional mask
        whose transparent pixels are repainted, and the generation fields."""
        principal = await principal_of(request, self.auth)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            raise PayloadTooLarge(f"request body is larger than {self.max_body_bytes} bytes", field="body")
        async with request.form(max_files=8, max_fields=64, max_part_size=self.max_body_bytes) as form:
            images = [item for key in ("image", "image[]") for item in form.getlist(key)]
            files = [await item.read() for item in images if isinstance(item, UploadFile)]
            mask_part = form.get("mask")
            mask = await mask_part.read() if isinstance(mask_part, UploadFile) else None
            values = {key: value for key, value in form.items() if isinstance(value, str)}
        if not files:
            raise InvalidRequest("give the image to edit as image (a file)", field="image", rule="required")
        given = convert(values, ImageGenerationRequest, strict=False)
        edit: dict[str, Any] = {"init_image": base64.b64encode(files[0]).decode(), "strength": EDIT_STRENGTH}
        if len(files) > 1:
            edit["references"] = [{"image": base64.b64encode(data).decode()} for data in files[1:]]
        if mask is not None:
            edit["mask"] = await anyio.to_thread.run_sync(_repaint_mask, mask)
            edit["strength"] = 1.0
        if given.size == "auto":
            edit |= {"width": None, "height": None}  # the size follows the image
        return await self._run(request, principal, given, edit)

    async def _run(
        self, request: Request, principal: Principal, given: ImageGenerationRequest, extra: dict[str, Any]
    ) -> Response:
        catalog = self.ingress.catalog
        model = catalog.find(given.model or "") or catalog.default
        fields = generation_fields(given, model) | extra
        record, reuse = await self.ingress.submit(
            convert(fields, GenerationRequest), principal=principal, idempotency_key=idempotency_key(request)
        )
        headers = {"Result-Cache": "hit"} if reuse == "cached" else {}
        if given.stream:
            return StreamingResponse(self._events(record, given), media_type="text/event-stream", headers=headers)
        finished = await until_finished(self.ingress, self.hub, record)
        if finished.state is not TaskState.SUCCEEDED:
            refused = finished.error_code in ("filtered", "invalid_request")  # the request's fault, not ours
            raise GenerationFailed(finished, 400 if refused else 500)
        images = await image_bytes(self.results, finished)
        if given.response_format == "url":
            base = str(request.base_url).rstrip("/")
            data = [{"url": base + image_url(finished.id, index)} for index in range(len(images))]
        else:
            data = [{"b64_json": base64.b64encode(image).decode()} for image in images]
        return JSONResponse(
            {
                "created": int(finished.created_at),
                "data": [{**item, "revised_prompt": None} for item in data],
                "background": "transparent" if given.background == "transparent" else "opaque",
                "output_format": given.output_format,
                "quality": _quality(given.quality),
                "size": f"{finished.spec.width}x{finished.spec.height}",
                "usage": _usage(),
            },
            headers=headers,
        )

    async def _events(self, record: TaskRecord, given: ImageGenerationRequest) -> AsyncIterator[bytes]:
        """Server-sent events: up to `partial_images` previews spread over the steps, then each image."""
        common = {
            "background": given.background,
            "output_format": given.output_format,
            "quality": _quality(given.quality),
            "size": f"{record.spec.width}x{record.spec.height}",
        }
        send, receive = anyio.create_memory_object_stream[bytes](64)
        partials_sent = [0]

        async def on_progress(event: Progress) -> None:
            index = _partial_index(event, given.partial_images, partials_sent[0])
            if index is None or event.preview_jpeg_b64 is None:
                return
            partials_sent[0] += 1
            image = await anyio.to_thread.run_sync(_as_format, event.preview_jpeg_b64, given.output_format)
            await send.send(_sse("image_generation.partial_image", {
                **common, "type": "image_generation.partial_image", "b64_json": image,
                "created_at": int(time.time()), "partial_image_index": index,
            }))  # fmt: skip

        async def follow() -> None:
            async with send:
                finished = await until_finished(self.ingress, self.hub, record, on_progress)
                if finished.state is not TaskState.SUCCEEDED:
                    error = {"message": finished.error_message or f"the generation ended {finished.state}",
                             "type": "server_error", "param": None, "code": finished.error_code}  # fmt: skip
                    await send.send(_sse("error", {"type": "error", "error": error}))
                    return
                for data in await image_bytes(self.results, finished):
                    await send.send(_sse("image_generation.completed", {
                        **common, "type": "image_generation.completed", "b64_json": base64.b64encode(data).decode(),
                        "created_at": int(time.time()), "usage": _usage(),
                    }))  # fmt: skip

        async with anyio.create_task_group() as group:
            group.start_soon(follow)
            async with receive:
                async for chunk in receive:
                    yield chunk


def _partial_index(event: Progress, wanted: int, sent: int) -> int | None:
    """Partial image k goes out once (k+1)/(wanted+1) of the steps are done."""
    if sent >= wanted or not event.total:
        return None
    return sent if event.step / event.total >= (sent + 1) / (wanted + 1) else None


def _quality(quality: str) -> str:
    return {"standard": "medium", "hd": "high"}.get(quality, quality)


def _usage() -> dict[str, Any]:
    """No tokens are counted here; the SDK's types ask for the fields."""
    return {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0,
            "input_tokens_details": {"image_tokens": 0, "text_tokens": 0}}  # fmt: skip


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def _as_format(preview_jpeg_b64: str, output_format: str) -> str:
    with Image.open(io.BytesIO(base64.b64decode(preview_jpeg_b64))) as image:
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format=output_format.upper())
    return base64.b64encode(buffer.getvalue()).decode()


def _repaint_mask(data: bytes) -> str:
    """OpenAI's mask (transparent pixels are repainted) as ours (white repaints)."""
    return mask_as_ours(data, lambda image: image.convert("RGBA").getchannel("A").point(lambda a: 255 if a == 0 else 0))
