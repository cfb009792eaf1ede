"""MCP adapter: tools and resources for AI assistants, over streamable HTTP (/mcp) and SSE (/sse).

Same ingress and store as REST: a generation started here is visible there, and errors carry the
same codes and field names, as a JSON object in the tool error's text.
"""

from __future__ import annotations

import base64
import io
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

import anyio
import anyio.to_thread
import msgspec
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceNotFoundError
from mcp.server.transport_security import TransportSecuritySettings
from mcp.types import CallToolResult, ImageContent, ResourceLink, TextContent
from PIL import Image
from pydantic import Field
from starlette.applications import Starlette

from actors.encoding import png_base64
from actors.files import Files
from actors.hub import Events
from actors.ingress import Ingress
from forge import __version__
from forge.auth import Authenticator, Principal, Unauthorized
from forge.characters import (
    CharacterAnimationRequest,
    CharacterCreate,
    CharacterSheetRequest,
    animation_generation,
    sheet_generation,
)
from forge.errors import ForgeError, InvalidRequest, NotFound
from forge.events import Progress
from forge.requests import MAX_IMAGES, MAX_REFERENCES, MAX_SEED, GenerationRequest, Tiling, VariationMode
from forge.resolve import preset_size
from forge.tasks import TaskRecord, TaskState
from forge.validation import convert
from protocols.identity import RequireBearer, visible_owner
from protocols.task_wait import until_finished
from protocols.views import error_view, task_view

THUMBNAIL_SIDE = 256  # image content stays small; the full-size file is a resource link
IMAGE_URI = "chara-forge://generations/{task_id}/images/{index}"
IMAGE_URI_PATTERN = re.compile(r"^chara-forge://generations/(?P<task_id>[0-9a-f]{32})/images/(?P<index>[0-9]{1,3})$")
LOOPBACK_HOSTS = ("127.0.0.1:*", "localhost:*", "[::1]:*")
LOOPBACK_ORIGINS = ("http://127.0.0.1:*", "http://localhost:*", "http://[::1]:*")

INSTRUCTIONS = """Chara Forge draws game characters from a text description with SDXL.
Call generate_character with a description of one character; it waits for the images by default and
returns small previews plus links to the full-size PNGs. Use wait=false for long jobs, then poll
get_generation. Errors are JSON with `code`, `message` and, for bad input, the `field` at fault."""


def transport_security(allowed_hosts: str, allowed_origins: str) -> TransportSecuritySettings:
    """DNS-rebinding protection, always on: a bad Host gets 421, a bad Origin 403."""

    def split(value: str, default: tuple[str, ...]) -> list[str]:
        return [item.strip() for item in value.split(",") if item.strip()] or list(default)

    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=split(allowed_hosts, LOOPBACK_HOSTS),
        allowed_origins=split(allowed_origins, LOOPBACK_ORIGINS),
    )


def _error(exc: ForgeError) -> CallToolResult:
    """A tool error whose text is exactly the REST API's error object (code, message, field, rule)."""
    return _error_result(msgspec.json.encode(error_view(exc).error).decode())


def _error_result(text: str) -> CallToolResult:
    return CallToolResult(content=[TextContent(text=text)], is_error=True)


class McpAdapter:
    def __init__(self, *, ingress: Ingress, hub: Events, results: Files, auth: Authenticator) -> None:
        self._auth = auth
        self._ingress = ingress
        self._hub = hub
        self._results = results
        self.server = MCPServer(name="chara-forge", version=__version__, instructions=INSTRUCTIONS)
        self._register()

    def app(self, security: TransportSecuritySettings, *, stateless: bool = False) -> Starlette:
        """`stateless`: streamable HTTP keeps no session between requests, so behind a plain balancer any node
        answers any request (a fleet's API nodes); progress still streams in each tool call's response."""
        streamable = self.server.streamable_http_app(
            streamable_http_path="/mcp", transport_security=security, stateless_http=stateless
        )
        sse = self.server.sse_app(sse_path="/sse", message_path="/messages/", transport_security=security)

        @asynccontextmanager
        async def lifespan(_: Starlette) -> AsyncIterator[None]:
            async with self.server.session_manager.run():
                yield

        app = Starlette(routes=[*streamable.routes, *sse.routes], lifespan=lifespan)
        app.add_middleware(RequireBearer, auth=self._auth)
        return app

    # -- tools --

    def _register(self) -> None:
        server = self.server

        @server.tool(
            structured_output=False,
            description="Generate images of one game character from a text description. By default waits "
            "and returns PNG previews, a link to each full-size image, and the task id. Progress "
            "notifications are sent while it denoises when the request carries a progress token.",
        )
        async def generate_character(
            prompt: Annotated[
                str, Field(description="the character: look, outfit, pose, setting; {a|b} picks one of a and b")
            ],
            ctx: Context,
            style: Annotated[
                str | list[str] | None, Field(description="a style from list_styles, or several to stack")
            ] = None,
            pose: Annotated[
                str | None,
                Field(
                    description="a pose template (front, back, left, right, three-quarter, t-pose, run, jump, "
                    "attack, cast, turnaround) for openpose control"
                ),
            ] = None,
            model: Annotated[str | None, Field(description="a model id; the server's default when absent")] = None,
            postprocess: Annotated[
                dict[str, Any] | None,
                Field(
                    description="game-asset steps, as in the REST API: {upscale: 2|4, remove_background: bool, "
                    "trim: bool, pixel_art: {factor, colors | palette, outline}, resize: {width, height, mode}, "
                    "sprite_sheet: {columns}}"
                ),
            ] = None,
            size: Annotated[
                str | None,
                Field(description="'square', 'portrait', 'landscape', or WIDTHxHEIGHT in pixels (multiples of 8)"),
            ] = None,
            num_images: Annotated[int, Field(ge=1, le=MAX_IMAGES, description="how many variations")] = 1,
            seed: Annotated[int | None, Field(ge=0, le=MAX_SEED, description="same seed, same image")] = None,
            negative_prompt: Annotated[str, Field(description="what to avoid")] = "",
            init_image: Annotated[
                str | None,
                Field(
                    description="img2img: start from this image, as base64 or an earlier generation's resource URI "
                    "(chara-forge://generations/<id>/images/<n>)"
                ),
            ] = None,
            strength: Annotated[float, Field(ge=0, le=1, description="img2img: how much is repainted")] = 0.6,
            mask: Annotated[
                str | None,
                Field(
                    description="inpainting: white repaints, black keeps; base64 or a resource URI (with init_image)"
                ),
            ] = None,
            character: Annotated[
                str | None, Field(description="a saved character (list_characters): its description and defaults apply")
            ] = None,
            references: Annotated[
                list[str | dict[str, Any]],
                Field(
                    description="reference images to keep a look: each base64 or a resource URI, or "
                    "{image, strength (0-1), mode (full | style | composition), start, end}",
                    max_length=MAX_REFERENCES,
                ),
            ] = [],  # noqa: B006
            hires: Annotated[
                dict[str, Any] | None,
                Field(
                    description="the hires fix, a second pass at a larger size: {scale (2), upscaler (latent | "
                    "lanczos | an upscaler model), steps (0: the first pass's), denoise (0-1)}"
                ),
            ] = None,
            vae: Annotated[
                str | None, Field(description="a VAE (GET /v1/models lists them); Automatic or absent: the model's")
            ] = None,
            clip_skip: Annotated[
                int | None,
                Field(
                    description="the text encoders' layer counted from the end (1-12; 2: SDXL's); absent: the model's"
                ),
            ] = None,
            tiling: Annotated[
                Tiling,
                Field(description="seamless tiles (textures, backgrounds): wrap around on x, y or both axes"),
            ] = "none",
            variations: Annotated[
                VariationMode,
                Field(
                    description="{a|b} choices and __name__ wildcards in the prompt: random (each image's seed "
                    "picks), combinatorial (each combination once, one per image) or off (as written)"
                ),
            ] = "random",
            grid: Annotated[
                dict[str, Any] | None,
                Field(
                    description="a prompt matrix, one image per combination plus a labelled grid image: {x: {field, "
                    "values}, y: {field, values}}; fields prompt and negative_prompt (the first value is replaced "
                    "by each), seed, steps, guidance_scale, scheduler, clip_skip"
                ),
            ] = None,
            wait: Annotated[bool, Field(description="wait for the images (else return the task id)")] = True,
        ) -> list[TextContent | ImageContent | ResourceLink] | CallToolResult:
            fields: dict[str, Any] = {
                "prompt": prompt,
                "negative_prompt": negative_prompt,
                "num_images": num_images,
                "variations": variations,
            }
            if grid is not None:
                fields["grid"] = grid
            if character is not None:
                fields["character"] = character
            if style is not None:
                fields["style"] = style
            if pose is not None:
                fields["control"] = {"type": "openpose", "pose": pose}
            if model is not None:
                fields["model"] = model
            if postprocess is not None:
                fields["postprocess"] = postprocess
            if seed is not None:
                fields["seed"] = seed
            if hires is not None:
                fields["hires"] = hires
            if vae is not None:
                fields["vae"] = vae
            if clip_skip is not None:
                fields["clip_skip"] = clip_skip
            if tiling != "none":
                fields["tiling"] = tiling
            try:
                principal = await self._principal(ctx)
                for name, image in (("init_image", init_image), ("mask", mask)):
                    if image is not None:
                        fields[name] = await self._image_input(image, name, principal)
                if init_image is not None:
                    fields["strength"] = strength
                resolved = []
                for index, reference in enumerate(references):
                    given = {"image": reference} if isinstance(reference, str) else dict(reference)
                    name = f"references[{index}]"
                    if not isinstance(given.get("image"), str):
                        raise InvalidRequest("each reference needs an image", field=f"{name}.image")
                    given["image"] = await self._image_input(given["image"], f"{name}.image", principal)
                    resolved.append(given)
                if resolved:
                    fields["references"] = resolved
                fields.update(self._size(size))
                return await self._generate(convert(fields, GenerationRequest), principal, ctx, wait)
            except ForgeError as exc:
                return _error(exc)

        @server.tool(
            structured_output=False,
            description="A sheet of a saved character as one generation: a turnaround (front, three-quarter, "
            "side, back), expressions, or poses, all from one seed with its references, packed into a sprite "
            "sheet too. Returns the images like generate_character.",
        )
        async def character_sheet(
            character: Annotated[str, Field(description="a saved character (list_characters), by name or id")],
            ctx: Context,
            kind: Annotated[
                Literal["turnaround", "expressions", "poses"], Field(description="which views")
            ] = "turnaround",
            expressions: Annotated[
                list[str] | None, Field(description="expressions: default neutral, happy, angry, sad, surprised")
            ] = None,
            poses: Annotated[list[str], Field(description="poses: pose templates, e.g. run, jump, attack")] = [],  # noqa: B006
            prompt: Annotated[str, Field(description="words added to every view")] = "full body",
            style: Annotated[str | None, Field(description="a style from list_styles")] = None,
            seed: Annotated[int | None, Field(ge=0, le=MAX_SEED, description="same seed, same sheet")] = None,
            wait: Annotated[bool, Field(description="wait for the images (else return the task id)")] = True,
        ) -> list[TextContent | ImageContent | ResourceLink] | CallToolResult:
            fields: dict[str, Any] = {"kind": kind, "poses": poses, "prompt": prompt, "style": style, "seed": seed}
            if expressions is not None:
                fields["expressions"] = expressions
            try:
                principal = await self._principal(ctx)
                sheet = convert(fields, CharacterSheetRequest)
                sheet.check()
                found = await self._ingress.characters.get(character, owner=principal.owner, field="character")
                return await self._generate(sheet_generation(found.id, sheet), principal, ctx, wait)
            except ForgeError as exc:
                return _error(exc)

        @server.tool(
            structured_output=False,
            description="An animation cycle of a saved character as one generation: an action (idle, walk, run, "
            "attack, jump) in 1, 4 or 8 directions, every frame from one seed with its references. The answer's "
            "`animation` links an animated GIF or WebP per direction and Aseprite and Godot atlases of the "
            "sprite sheet (a row per direction); the frames follow as images like generate_character.",
        )
        async def animate_character(
            character: Annotated[str, Field(description="a saved character (list_characters), by name or id")],
            ctx: Context,
            action: Annotated[
                str | list[str], Field(description="idle, walk, run, attack or jump; or pose templates, one per frame")
            ] = "walk",
            directions: Annotated[Literal[1, 4, 8], Field(description="1: S; 4: S, W, N, E; 8: also diagonals")] = 4,
            frames: Annotated[int | None, Field(description="frames per cycle, 4-12 (6 when absent)")] = None,
            frame_size: Annotated[int | None, Field(description="each frame scaled into a square cell")] = None,
            prompt: Annotated[str, Field(description="words added to every frame")] = "full body",
            style: Annotated[str | None, Field(description="a style from list_styles")] = None,
            size: Annotated[str | None, Field(description="square, portrait, landscape or WIDTHxHEIGHT")] = None,
            steps: Annotated[int | None, Field(description="denoising steps")] = None,
            seed: Annotated[int | None, Field(ge=0, le=MAX_SEED, description="same seed, same animation")] = None,
            postprocess: Annotated[
                dict[str, Any] | None, Field(description="as generate_character's, run on every frame")
            ] = None,
            wait: Annotated[bool, Field(description="wait for the frames (else return the task id)")] = True,
        ) -> list[TextContent | ImageContent | ResourceLink] | CallToolResult:
            fields: dict[str, Any] = {
                "action": action,
                "directions": directions,
                "frames": frames,
                "frame_size": frame_size,
                "prompt": prompt,
                "style": style,
                "steps": steps,
                "seed": seed,
                "postprocess": postprocess,
            }
            try:
                fields |= self._size(size)
                principal = await self._principal(ctx)
                animation = convert(fields, CharacterAnimationRequest)
                found = await self._ingress.characters.get(character, owner=principal.owner, field="character")
                return await self._generate(animation_generation(found.id, animation), principal, ctx, wait)
            except ForgeError as exc:
                return _error(exc)

        @server.tool(
            structured_output=False, description="State, progress, seeds and image links of a generation, by task id."
        )
        async def get_generation(id: Annotated[str, Field(description="the task id")], ctx: Context) -> CallToolResult:
            try:
                owner = visible_owner(await self._principal(ctx))
                return CallToolResult(content=[await self._summary(await self._ingress.get(id, owner=owner))])
            except ForgeError as exc:
                return _error(exc)

        @server.tool(structured_output=False, description="Cancel a generation, queued or running, by task id.")
        async def cancel_generation(
            id: Annotated[str, Field(description="the task id")], ctx: Context
        ) -> CallToolResult:
            try:
                owner = visible_owner(await self._principal(ctx))
                return CallToolResult(content=[await self._summary(await self._ingress.cancel(id, owner=owner))])
            except ForgeError as exc:
                return _error(exc)

        @server.tool(
            structured_output=False, description="The styles generate_character accepts, with what each looks like."
        )
        async def list_styles() -> str:
            styles = self._ingress.resources.styles.all()
            return json.dumps([{"name": style.name, "description": style.description} for style in styles])

        @server.tool(
            structured_output=False,
            description="Save a character to reuse: a name, a description woven into every generation of it, "
            "and optional reference images (base64 or earlier generations' resource URIs). Then pass its name "
            "as `character` to generate_character.",
        )
        async def create_character(
            name: Annotated[str, Field(description="letters, digits, . _ -; unique among your characters")],
            description: Annotated[str, Field(description="what the character looks like")],
            ctx: Context,
            references: Annotated[list[str], Field(description="reference images", max_length=4)] = [],  # noqa: B006
            negative_prompt: Annotated[str, Field(description="what to avoid in every generation of it")] = "",
        ) -> CallToolResult:
            try:
                principal = await self._principal(ctx)
                images = [
                    await self._image_input(image, f"references[{index}]", principal)
                    for index, image in enumerate(references)
                ]
                create = convert(
                    {
                        "name": name,
                        "description": description,
                        "references": images,
                        "defaults": {"negative_prompt": negative_prompt},
                    },
                    CharacterCreate,
                )
                character = await self._ingress.characters.create(principal.owner, create)
            except ForgeError as exc:
                return _error(exc)
            return CallToolResult(content=[TextContent(text=msgspec.json.encode(character).decode())])

        @server.tool(
            structured_output=False, description="Your saved characters, for generate_character's `character`."
        )
        async def list_characters(ctx: Context) -> CallToolResult:
            try:
                owner = visible_owner(await self._principal(ctx))
                characters = await self._ingress.characters.list(owner=owner)
            except ForgeError as exc:
                return _error(exc)
            return CallToolResult(content=[TextContent(text=msgspec.json.encode(characters).decode())])

        @server.resource(
            IMAGE_URI, name="generated-image", mime_type="image/png", description="A finished image, full size, as PNG"
        )
        async def generated_image(task_id: str, index: str, ctx: Context) -> bytes:
            try:
                record = await self._ingress.get(task_id, owner=visible_owner(await self._principal(ctx)))
            except (NotFound, Unauthorized) as exc:
                raise ResourceNotFoundError(exc.message) from None
            if not index.isdigit() or int(index) >= len(record.images):
                raise ResourceNotFoundError(f"generation {task_id} has no image {index}")
            return await anyio.to_thread.run_sync(self._png, record.images[int(index)])

    # -- helpers --

    async def _generate(
        self, request: GenerationRequest, principal: Principal, ctx: Context, wait: bool
    ) -> list[TextContent | ImageContent | ResourceLink] | CallToolResult:
        """Submit; unless told not to wait, follow the task to its end and return its images."""
        record, _ = await self._ingress.submit(request, principal=principal)
        if not wait:
            return [await self._summary(record)]
        record = await self._follow(record, ctx)
        if record.state is not TaskState.SUCCEEDED:
            code = record.error_code or str(record.state)
            message = record.error_message or f"the generation ended {record.state}"
            return _error_result(json.dumps({"code": code, "message": message, "id": record.id}))
        images = await anyio.to_thread.run_sync(self._images, record)
        return [await self._summary(record), *images]

    async def _principal(self, ctx: Context) -> Principal:
        """Each MCP request carries its own bearer token (HTTP transports)."""
        request = ctx.request_context.request
        headers = getattr(request, "headers", None)
        header = headers.get("authorization") if headers is not None else None
        if not self._auth.enabled:
            return self._auth.principal(header)
        return await anyio.to_thread.run_sync(self._auth.principal, header)

    async def _image_input(self, value: str, field: str, principal: Principal) -> str:
        """Base64 as it is; an earlier generation's image (its resource URI) as that image's base64."""
        found = IMAGE_URI_PATTERN.match(value)
        if found is None:
            return value
        record = await self._ingress.get(found["task_id"], owner=visible_owner(principal))
        index = int(found["index"])
        data = None
        if index < len(record.images):
            data = await anyio.to_thread.run_sync(self._results.read, record.images[index])
        if data is None:
            raise InvalidRequest(f"generation {record.id} has no image {index}", field=field, rule="unknown_image")
        return base64.b64encode(data).decode()

    def _size(self, size: str | None) -> dict[str, int]:
        if size is None:
            return {}
        preset = preset_size(self._ingress.model, size)
        if preset is not None:
            return {"width": preset[0], "height": preset[1]}
        parts = size.lower().split("x")
        if len(parts) == 2 and all(part.isdigit() for part in parts):
            return {"width": int(parts[0]), "height": int(parts[1])}
        raise InvalidRequest("size must be square, portrait, landscape or WIDTHxHEIGHT", field="size", rule="format")

    async def _follow(self, record: TaskRecord, ctx: Context) -> TaskRecord:
        """Relay progress until the task ends; if the MCP request is cancelled, cancel the task too."""

        async def report(event: Progress) -> None:
            await ctx.report_progress(event.step, event.total, f"step {event.step}/{event.total}")

        try:
            return await until_finished(self._ingress, self._hub, record, report)
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                await self._ingress.cancel(record.id, owner=record.owner)
            raise

    async def _summary(self, record: TaskRecord) -> TextContent:
        body = msgspec.to_builtins(task_view(record, await self._ingress.live(record)))
        body["resources"] = [IMAGE_URI.format(task_id=record.id, index=i) for i in range(len(record.images))]
        return TextContent(text=json.dumps(body))

    def _images(self, record: TaskRecord) -> list[ImageContent | ResourceLink]:
        content: list[ImageContent | ResourceLink] = []
        for index, path in enumerate(record.images):
            content.append(ImageContent(data=self._thumbnail(path), mime_type="image/png"))
            content.append(
                ResourceLink(
                    uri=IMAGE_URI.format(task_id=record.id, index=index),
                    name=f"{record.id}-{index}.png",
                    mime_type="image/png",
                )
            )
        return content

    def _read(self, name: str) -> bytes:
        data = self._results.read(name)
        if data is None:
            raise ResourceNotFoundError(f"{name} is no longer kept")
        return data

    def _thumbnail(self, name: str) -> str:
        with Image.open(io.BytesIO(self._read(name))) as image:
            image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
            return png_base64(image)

    def _png(self, name: str) -> bytes:
        data = self._read(name)
        if name.endswith(".png"):
            return data
        with Image.open(io.BytesIO(data)) as image:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
        return buffer.getvalue()
