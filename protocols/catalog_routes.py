"""REST routes for what requests can name: styles, LoRAs, pose templates, models (with admin load/unload)
and uploaded control images."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Annotated, Any

import anyio
import msgspec
from msgspec import Meta
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from actors.ingress import Ingress
from actors.model_catalog import ModelStatus
from engines.palettes import PALETTES
from engines.poses import DESCRIPTIONS, POSE_NAMES, is_pose, render_pose
from forge.auth import Authenticator
from forge.errors import Forbidden, NotFound
from forge.loras import LoraInfo
from forge.styles import Style, StyleDefaults
from forge.validation import convert
from protocols.http_io import JSONResponse, read_body
from protocols.identity import is_loopback, principal_of, require_admin, require_shared_secret


class StyleLoraView(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    weight: float
    installed: bool


class StyleView(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    description: str
    prompt: str
    negative_prompt: str
    loras: list[StyleLoraView]
    defaults: StyleDefaults
    control: dict[str, Any] | None
    postprocess: dict[str, Any] | None
    available: bool
    missing: list[str]


class PoseView(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    description: str
    image: str


class StyleList(msgspec.Struct, frozen=True):
    items: list[StyleView]


class LoraList(msgspec.Struct, frozen=True, kw_only=True):
    items: list[LoraInfo]
    directory: Annotated[str, Meta(description="where LoRA files are looked for")]


class PoseList(msgspec.Struct, frozen=True):
    items: list[PoseView]


class WildcardView(msgspec.Struct, frozen=True, kw_only=True):
    name: Annotated[str, Meta(description="written __name__ in a prompt")]
    choices: int


class WildcardList(msgspec.Struct, frozen=True, kw_only=True):
    items: list[WildcardView]
    directory: Annotated[str, Meta(description="where wildcard files (<name>.txt) are looked for")]


class ModelList(msgspec.Struct, frozen=True):
    items: list[ModelStatus]


class PostprocessCatalog(msgspec.Struct, frozen=True, kw_only=True):
    upscalers: list[str]
    upscalers_dir: str
    default_upscaler: str
    background_models: list[str]
    background_models_dir: str
    default_background_model: str
    palettes: Annotated[dict[str, list[str]], Meta(description="name: colours as #rrggbb")]


class UploadView(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    width: int
    height: int


class PoseQuery(msgspec.Struct, forbid_unknown_fields=True):
    width: Annotated[int, Meta(ge=64, le=2048)] = 512
    height: Annotated[int, Meta(ge=64, le=2048)] = 512


@dataclass(frozen=True)
class CatalogRoutes:
    ingress: Ingress
    admin_key: str
    auth: Authenticator

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/v1/styles", self.styles, methods=["GET"]),
            Route("/v1/loras", self.loras, methods=["GET"]),
            Route("/v1/poses", self.poses, methods=["GET"]),
            Route("/v1/wildcards", self.wildcards, methods=["GET"]),
            Route("/v1/poses/{name}.png", self.pose_image, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{id:path}/load", self.load_model, methods=["POST"]),
            Route("/v1/models/{id:path}/unload", self.unload_model, methods=["POST"]),
            Route("/v1/models/{id:path}", self.model, methods=["GET"]),
            Route("/v1/uploads", self.upload, methods=["POST"]),
            Route("/v1/postprocess", self.postprocess, methods=["GET"]),
        ]

    # -- styles, LoRAs, poses --

    def style_view(self, style: Style) -> StyleView:
        loras = self.ingress.resources.loras
        lora_views = [
            StyleLoraView(name=lora.name, weight=lora.weight, installed=loras.path(lora.name) is not None)
            for lora in style.loras
        ]
        missing = [f"LoRA {view.name}" for view in lora_views if not view.installed]
        control = None
        if style.control is not None:
            control = msgspec.structs.asdict(style.control)
            if style.control.type not in self.ingress.model.controlnets:
                missing.append(f"{style.control.type} ControlNet")
        postprocess = None
        if style.postprocess is not None:
            postprocess = msgspec.to_builtins(style.postprocess)
            resources = self.ingress.resources
            options = style.postprocess
            if options.upscale and resources.upscalers.path(options.upscaler or resources.default_upscaler) is None:
                missing.append(f"upscaler {options.upscaler or resources.default_upscaler}")
            background = options.background_model or resources.default_background_model
            if options.remove_background and resources.background_models.path(background) is None:
                missing.append(f"background model {background}")
        return StyleView(
            name=style.name,
            description=style.description,
            prompt=style.prompt,
            negative_prompt=style.negative_prompt,
            loras=lora_views,
            defaults=style.defaults,
            control=control,
            postprocess=postprocess,
            available=not missing,
            missing=missing,
        )

    async def styles(self, request: Request) -> Response:
        await principal_of(request, self.auth)
        return JSONResponse(StyleList([self.style_view(style) for style in self.ingress.resources.styles.all()]))

    async def loras(self, request: Request) -> Response:
        await principal_of(request, self.auth)
        found: list[LoraInfo] = await anyio.to_thread.run_sync(self.ingress.resources.loras.installed)
        return JSONResponse(LoraList(items=found, directory=str(self.ingress.resources.loras.directory)))

    async def poses(self, request: Request) -> Response:
        await principal_of(request, self.auth)
        views = [
            PoseView(name=name, description=DESCRIPTIONS[name], image=f"/v1/poses/{name}.png") for name in POSE_NAMES
        ]
        return JSONResponse(PoseList(views))

    async def wildcards(self, request: Request) -> Response:
        await principal_of(request, self.auth)
        variations = self.ingress.resources.variations
        found = await anyio.to_thread.run_sync(variations.wildcards)
        items = [WildcardView(name=name, choices=choices) for name, choices in found]
        return JSONResponse(WildcardList(items=items, directory=str(variations.folder or "")))

    async def pose_image(self, request: Request) -> Response:
        await principal_of(request, self.auth)
        name = request.path_params["name"]
        if not is_pose(name):
            raise NotFound(
                f"no pose template {name!r}; known: {', '.join(POSE_NAMES)}, and animation frames such as walk-6f-sw-2",
                field="name",
            )
        size = convert(dict(request.query_params), PoseQuery, strict=False)

        def encode() -> bytes:
            buffer = io.BytesIO()
            render_pose(name, size.width, size.height).save(buffer, format="PNG")
            return buffer.getvalue()

        return Response(await anyio.to_thread.run_sync(encode), media_type="image/png")

    async def postprocess(self, request: Request) -> Response:
        """Installed upscalers and background models, and the named pixel-art palettes."""
        await principal_of(request, self.auth)
        resources = self.ingress.resources

        def listing() -> PostprocessCatalog:
            return PostprocessCatalog(
                upscalers=resources.upscalers.names(),
                upscalers_dir=str(resources.upscalers.directory),
                default_upscaler=resources.default_upscaler,
                background_models=resources.background_models.names(),
                background_models_dir=str(resources.background_models.directory),
                default_background_model=resources.default_background_model,
                palettes={name: [f"#{c}" for c in colours] for name, colours in PALETTES.items()},
            )

        return JSONResponse(await anyio.to_thread.run_sync(listing))

    # -- models --

    async def models(self, request: Request) -> Response:
        await principal_of(request, self.auth)
        return JSONResponse(ModelList(await self.ingress.model_statuses()))

    async def model(self, request: Request) -> Response:
        await principal_of(request, self.auth)
        return JSONResponse(await self.ingress.model_status(request.path_params["id"]))

    async def load_model(self, request: Request) -> Response:
        """Every engine (every worker's, in a fleet) loads the model; answers once they hold it."""
        await self._require_admin(request)
        model_id = request.path_params["id"]
        await self.ingress.model_status(model_id)
        model = self.ingress.catalog.find(model_id)
        assert model is not None
        await self.ingress.models.load(model)
        return JSONResponse(await self.ingress.model_status(model_id))

    async def unload_model(self, request: Request) -> Response:
        await self._require_admin(request)
        model_id = request.path_params["id"]
        await self.ingress.model_status(model_id)
        await self.ingress.models.unload(model_id)
        return JSONResponse(await self.ingress.model_status(model_id))

    async def _require_admin(self, request: Request) -> None:
        """With auth on: the admin scope. Otherwise: the admin key when one is set, else a local client."""
        if self.auth.enabled:
            require_admin(await principal_of(request, self.auth))
            return
        if not self.admin_key:
            client = request.client.host if request.client else None
            if client is None or not is_loopback(client):
                raise Forbidden("admin endpoints answer only local clients unless FORGE_ADMIN_KEY is set")
            return
        require_shared_secret(request, self.admin_key, "admin key")

    # -- uploads --

    async def upload(self, request: Request) -> Response:
        """The raw image as the body (image/png, image/jpeg, image/webp); the id goes in `control.image`."""
        await principal_of(request, self.auth)
        uploads = self.ingress.uploads
        body = await read_body(request, uploads.max_bytes)
        upload_id, width, height = await anyio.to_thread.run_sync(uploads.save, body)
        return JSONResponse(UploadView(id=upload_id, width=width, height=height), status_code=201)
