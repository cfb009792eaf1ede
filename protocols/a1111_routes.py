"""AUTOMATIC1111's API at `/sdapi/v1`, for Open WebUI, SillyTavern, LibreChat and scripts built on webuiapi.

Every generation is an ordinary task published through ingress: it shows in REST, the web UI and MCP,
counts against the caller's limits and can be cancelled like any other. The answer comes once the task has
ended, however long that takes.
"""

from __future__ import annotations

import base64
import io
import json
import re
import time
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.to_thread
from PIL import Image, ImageOps
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from actors.caller_models import CallerModels
from actors.encoding import mask_as_ours, read_parameters
from actors.files import Files
from actors.hub import Events
from actors.ingress import Ingress
from actors.uploads import decode_inline
from engines.schedulers import SAMPLERS
from forge import __version__
from forge.a1111 import (
    A1111_DEFAULT_SIZE,
    HIRES_FIELDS,
    SCHEDULES,
    A1111Request,
    a1111_sampler_names,
    control_units,
    hires_fields,
    loras_in_prompt,
    scheduler_for,
)
from forge.auth import Authenticator, Principal
from forge.errors import ForgeError, InvalidRequest
from forge.infotext import parse_infotext
from forge.requests import GenerationRequest
from forge.tasks import TaskRecord, TaskState
from forge.validation import convert, decode_json
from protocols.http_io import JSONResponse, read_body
from protocols.identity import principal_of
from protocols.task_wait import GenerationFailed, image_bytes, until_finished

SDAPI = "/sdapi/v1"
# Our request fields, as A1111 names them, for error messages a client can act on.
A1111_FIELDS = {
    "guidance_scale": "cfg_scale",
    "num_images": "batch_size",
    "strength": "denoising_strength",
    "init_image": "init_images[0]",
    "scheduler": "sampler_name",
    "model": "override_settings.sd_model_checkpoint",
    "style": "styles",
    "loras": "prompt",
    "control": "alwayson_scripts.ControlNet",
    "vae": "override_settings.sd_vae",
    "clip_skip": "override_settings.CLIP_stop_at_last_layers",
}
AUTOMATIC_VAE = "Automatic"


def _a1111_field(name: str | None) -> str | None:
    if name is None:
        return None
    if name in HIRES_FIELDS:
        return HIRES_FIELDS[name]
    head = name.split(".")[0].split("[")[0]
    return A1111_FIELDS.get(head, name)


def _clip_skip_owner(owner: str) -> str:
    """Each caller's CLIP_stop_at_last_layers is kept beside its model, under a key of its own."""
    return f"{owner}\x00CLIP_stop_at_last_layers"


def _clip_skip(value: Any, field_name: str) -> int:
    """A1111's CLIP_stop_at_last_layers as our clip_skip: the same count (1: the last layer), 1 to 12."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not number.is_integer() or not 1 <= number <= 12:
        raise InvalidRequest(f"{field_name} must be a whole number from 1 to 12", field=field_name, rule="range")
    return int(number)


def _vae_owner(owner: str) -> str:
    """Each caller's sd_vae is kept beside its model, under a key of its own."""
    return f"{owner}\x00sd_vae"


@dataclass
class A1111Routes:
    ingress: Ingress
    hub: Events
    results: Files
    auth: Authenticator
    max_body_bytes: int
    models: CallerModels  # each caller's model from POST /options, in the store

    def routes(self) -> list[BaseRoute]:
        gets = {
            "/sd-models": self.sd_models,
            "/samplers": self.samplers,
            "/schedulers": self.schedulers,
            "/upscalers": self.upscalers,
            "/latent-upscale-modes": self.latent_upscale_modes,
            "/sd-vae": self.sd_vae,
            "/loras": self.loras,
            "/prompt-styles": self.prompt_styles,
            "/scripts": self.scripts,
            "/cmd-flags": self.cmd_flags,
            "/progress": self.progress,
            "/embeddings": self.embeddings,
        }
        posts = {
            "/txt2img": self.txt2img,
            "/img2img": self.img2img,
            "/interrupt": self.interrupt,
            "/skip": self.interrupt,
            "/refresh-checkpoints": self.refresh,
            "/png-info": self.png_info,
        }
        routes: list[BaseRoute] = [Route(SDAPI + path, handler, methods=["GET"]) for path, handler in gets.items()]
        routes += [Route(SDAPI + path, handler, methods=["POST"]) for path, handler in posts.items()]
        routes.append(Route(SDAPI + "/options", self.options_route, methods=["GET", "POST"]))
        return routes

    async def options_route(self, request: Request) -> Response:
        """One route for both methods, so a 405 lists both in its Allow header."""
        return await (self.set_options(request) if request.method == "POST" else self.options(request))

    # -- generation --

    async def txt2img(self, request: Request) -> Response:
        return await self._generate(request, img2img=False)

    async def img2img(self, request: Request) -> Response:
        return await self._generate(request, img2img=True)

    async def _generate(self, request: Request, *, img2img: bool) -> Response:
        principal = await principal_of(request, self.auth, basic=True)
        body = await read_body(request, self.max_body_bytes)
        echoed = decode_json(body, dict[str, Any])  # parsed once: echoed as A1111 does, then validated
        given = convert(echoed, A1111Request)
        fields, warnings = await self._fields(given, principal, img2img=img2img)
        records: list[TaskRecord] = []
        cached: list[str] = []
        try:
            seed = None if given.seed < 0 else given.seed
            for iteration in range(given.n_iter):
                wanted = {**fields, "seed": seed + iteration * given.batch_size} if seed is not None else fields
                record, reuse = await self.ingress.submit(convert(wanted, GenerationRequest), principal=principal)
                if reuse == "cached":
                    cached.append(record.id)
                if seed is None:  # the first iteration's random seed; the others follow it
                    seed = record.spec.seed
                records.append(await until_finished(self.ingress, self.hub, record))
                if records[-1].state is TaskState.CANCELLED:  # interrupted: the other iterations are not run
                    break
        except InvalidRequest as exc:
            raise InvalidRequest(exc.message, field=_a1111_field(exc.field), rule=exc.rule) from None
        failed = next((r for r in records if r.state is TaskState.FAILED), None)
        if failed is not None:
            raise GenerationFailed(failed)
        images = [data for record in records for data in await image_bytes(self.results, record)]
        infotexts = await anyio.to_thread.run_sync(lambda: [_parameters(data) for data in images])
        info = self._info(given, records, infotexts, warnings) | {"result_cache_hits": cached}
        return JSONResponse(
            {
                "images": [base64.b64encode(data).decode() for data in images],
                "parameters": echoed,
                "info": json.dumps(info),
            }
        )

    async def _fields(
        self, given: A1111Request, principal: Principal, *, img2img: bool
    ) -> tuple[dict[str, Any], list[str]]:
        """Our generation request's fields for an A1111 body, and the warnings for what was ignored."""
        prompt, loras = loras_in_prompt(given.prompt)
        controls, warnings = control_units(given.alwayson_scripts)
        fields: dict[str, Any] = {
            "prompt": prompt,
            "negative_prompt": given.negative_prompt,
            "num_images": given.batch_size,
            "width": _multiple_of_8(given.width or A1111_DEFAULT_SIZE),
            "height": _multiple_of_8(given.height or A1111_DEFAULT_SIZE),
            "output_format": "png",
        }
        if not prompt.strip():
            raise InvalidRequest("prompt must not be blank", field="prompt", rule="min_length")
        scheduler = scheduler_for(given.sampler_name or given.sampler_index, given.scheduler)
        optional = {
            "steps": given.steps,
            "guidance_scale": given.cfg_scale,
            "scheduler": scheduler,
            "style": given.styles or None,
            "loras": loras or None,
            "control": controls or None,
            "model": await self._model(given, principal),
            "vae": await self._vae(given, principal),
            "clip_skip": await self._clip_skip(given, principal),
        }
        fields |= {name: value for name, value in optional.items() if value is not None}
        if given.tiling:  # A1111 tiles on both axes
            fields["tiling"] = "both"
        if given.enable_hr and not img2img:  # A1111's img2img has no hires fix
            fields["hires"] = hires_fields(given)
        if img2img:
            fields |= await self._edit(given)
        return fields, warnings

    async def _model(self, given: A1111Request, principal: Principal) -> str | None:
        title = (given.override_settings or {}).get("sd_model_checkpoint")
        if title:
            return self._model_for_title(str(title), "override_settings.sd_model_checkpoint")
        return await anyio.to_thread.run_sync(self.models.get, principal.owner)

    def _model_for_title(self, title: str, field_name: str) -> str:
        """A model's A1111 title is its id, which is unique and what /options and overrides name."""
        if self.ingress.catalog.find(title) is None:
            raise InvalidRequest(
                f"unknown model {title!r}; GET {SDAPI}/sd-models lists them", field=field_name, rule="enum"
            )
        return title

    async def _clip_skip(self, given: A1111Request, principal: Principal) -> int | None:
        """The request's CLIP_stop_at_last_layers override, else the caller's from POST /options; None: the
        model's default (SDXL's 2, its native conditioning; A1111's own default, 1, reads SDXL at 2 too)."""
        override = (given.override_settings or {}).get("CLIP_stop_at_last_layers")
        if override is not None:
            return _clip_skip(override, "override_settings.CLIP_stop_at_last_layers")
        stored = await anyio.to_thread.run_sync(self.models.get, _clip_skip_owner(principal.owner))
        return int(stored) if stored else None

    async def _vae(self, given: A1111Request, principal: Principal) -> str | None:
        """The request's sd_vae override, else the caller's from POST /options (Automatic: the model's default)."""
        name = (given.override_settings or {}).get("sd_vae")
        if name:
            return self._vae_for_name(str(name), "override_settings.sd_vae")
        return await anyio.to_thread.run_sync(self.models.get, _vae_owner(principal.owner))

    def _vae_for_name(self, name: str, field_name: str) -> str:
        if name.lower() in ("automatic", "none") or name in self.ingress.catalog.default.vaes:
            return name
        known = ", ".join([AUTOMATIC_VAE, "None", *self.ingress.catalog.default.vaes])
        raise InvalidRequest(f"unknown VAE {name!r}; this server has {known}", field=field_name, rule="enum")

    async def _edit(self, given: A1111Request) -> dict[str, Any]:
        if not given.init_images:
            raise InvalidRequest("img2img needs init_images", field="init_images", rule="required")
        fields: dict[str, Any] = {"init_image": given.init_images[0]}
        if given.denoising_strength is not None:
            fields["strength"] = given.denoising_strength
        if given.width is None and given.height is None:  # the size follows the image
            fields["width"] = fields["height"] = None
        if given.mask:
            mask = given.mask
            if given.inpainting_mask_invert:
                mask = await anyio.to_thread.run_sync(_inverted, mask)
            fields |= {
                "mask": mask,
                "inpaint_area": "masked" if given.inpaint_full_res else "whole",
                "inpaint_padding": given.inpaint_full_res_padding,
            }
            if given.mask_blur is not None:
                fields["mask_blur"] = given.mask_blur
        return fields

    def _info(
        self, given: A1111Request, records: list[TaskRecord], infotexts: list[str], warnings: list[str]
    ) -> dict[str, Any]:
        spec = records[0].spec  # there is at least one: the first iteration ran or the request failed
        seeds = [seed for record in records for seed in record.spec.seeds]
        images = [record.spec.image_spec(index) for record in records for index in range(len(record.spec.seeds))]
        prompts = [image.styled_prompt for image in images]
        negatives = [image.styled_negative_prompt for image in images]
        sampler = SAMPLERS[spec.scheduler]
        return {
            "prompt": prompts[0],
            "all_prompts": prompts,
            "negative_prompt": negatives[0],
            "all_negative_prompts": negatives,
            "seed": seeds[0],
            "all_seeds": seeds,
            "subseed": -1,
            "all_subseeds": [-1] * len(seeds),
            "subseed_strength": 0,
            "width": spec.width,
            "height": spec.height,
            "sampler_name": sampler.a1111_sampler,
            "scheduler": sampler.a1111_schedule or "Automatic",
            "cfg_scale": spec.guidance_scale,
            "steps": spec.steps,
            "batch_size": given.batch_size,
            "restore_faces": False,
            "sd_model_name": spec.model,
            "sd_model_hash": None,
            "denoising_strength": spec.strength if spec.hires is None else spec.hires.denoise,
            "styles": spec.styles,
            "infotexts": infotexts,
            "index_of_first_image": 0,
            "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
            "clip_skip": spec.clip_skip or self.ingress.model.clip_skip,
            "version": f"chara-forge {__version__}",
            "task_ids": [record.id for record in records],
            "cancelled": any(record.state is TaskState.CANCELLED for record in records),
            "warnings": warnings,
        }

    # -- control --

    async def interrupt(self, request: Request) -> Response:
        """Cancel the caller's running tasks (never another user's)."""
        principal = await principal_of(request, self.auth, basic=True)
        for record in await self.ingress.list(owner=principal.owner, state=TaskState.RUNNING, limit=50):
            try:
                await self.ingress.cancel(record.id, owner=principal.owner)
            except ForgeError:
                continue  # it ended meanwhile
        return JSONResponse(None)

    async def progress(self, request: Request) -> Response:
        """The caller's newest running task, as A1111 reports its one job."""
        principal = await principal_of(request, self.auth, basic=True)
        running = await self.ingress.list(owner=principal.owner, state=TaskState.RUNNING, limit=1)
        queued = await self.ingress.list(owner=principal.owner, state=TaskState.QUEUED, limit=100)
        step, total, preview, eta = 0, 0, None, 0.0
        fraction = 0.0
        if running:
            live = await self.ingress.live(running[0])
            if live.progress is not None:
                step, total, preview = live.progress.step, live.progress.total, live.progress.preview_jpeg_b64
                fraction = step / total if total else 0.0
            started = running[0].started_at or time.time()
            if fraction > 0:
                elapsed = time.time() - started
                eta = max(0.0, elapsed / fraction - elapsed)
        return JSONResponse(
            {
                "progress": fraction,
                "eta_relative": eta,
                "state": {
                    "skipped": False,
                    "interrupted": False,
                    "stopping_generation": False,
                    "job": running[0].id if running else "",
                    "job_count": len(running) + len(queued),
                    "job_timestamp": "0",
                    "job_no": 0,
                    "sampling_step": step,
                    "sampling_steps": total,
                },
                "current_image": preview,
                "textinfo": None,
            }
        )

    # -- settings and lists --

    async def options(self, request: Request) -> Response:
        principal = await principal_of(request, self.auth, basic=True)
        model = await anyio.to_thread.run_sync(self.models.get, principal.owner) or self.ingress.model.id
        return JSONResponse(
            {
                "sd_model_checkpoint": model,
                "sd_checkpoint_hash": None,
                "sd_vae": await anyio.to_thread.run_sync(self.models.get, _vae_owner(principal.owner)) or AUTOMATIC_VAE,
                "samples_format": "png",
                "CLIP_stop_at_last_layers": int(
                    await anyio.to_thread.run_sync(self.models.get, _clip_skip_owner(principal.owner))
                    or self.ingress.model.clip_skip
                ),
                "eta_noise_seed_delta": 0,
                "sd_lora": "None",
            }
        )

    async def set_options(self, request: Request) -> Response:
        """Only the model, the VAE and CLIP_stop_at_last_layers are taken (for this caller, not for everyone);
        other options are accepted unchanged."""
        principal = await principal_of(request, self.auth, basic=True)
        body = await read_body(request, self.max_body_bytes)
        options = decode_json(body, dict[str, Any])
        title = options.get("sd_model_checkpoint")
        if title:
            model = self._model_for_title(str(title), "sd_model_checkpoint")
            await anyio.to_thread.run_sync(self.models.set, principal.owner, model)
        vae = options.get("sd_vae")
        if vae:
            vae = self._vae_for_name(str(vae), "sd_vae")
            await anyio.to_thread.run_sync(self.models.set, _vae_owner(principal.owner), vae)
        clip_skip = options.get("CLIP_stop_at_last_layers")
        if clip_skip is not None:
            chosen = _clip_skip(clip_skip, "CLIP_stop_at_last_layers")
            await anyio.to_thread.run_sync(self.models.set, _clip_skip_owner(principal.owner), str(chosen))
        return JSONResponse(None)

    async def png_info(self, request: Request) -> Response:
        """The infotext in an image and its parameters, as A1111 parses them (sizes split into -1 and -2)."""
        await principal_of(request, self.auth, basic=True)
        body = decode_json(await read_body(request, self.max_body_bytes), dict[str, Any])
        image = body.get("image")
        if not isinstance(image, str) or not image:
            raise InvalidRequest("png-info needs an image (base64)", field="image", rule="required")
        data = decode_inline(image, field="image")
        try:
            text = await anyio.to_thread.run_sync(_parameters, data)
        except OSError:
            raise InvalidRequest("the image cannot be read", field="image", rule="image") from None
        parameters = _parsed(text)
        if parameters:  # an SDXL image without one was made at SDXL's own conditioning, A1111's too
            parameters.setdefault("Clip skip", str(self.ingress.model.clip_skip))
        return JSONResponse({"info": text, "items": {"parameters": text} if text else {}, "parameters": parameters})

    async def refresh(self, request: Request) -> Response:
        await principal_of(request, self.auth, basic=True)
        return JSONResponse(None)

    async def sd_models(self, request: Request) -> Response:
        await principal_of(request, self.auth, basic=True)
        catalog = self.ingress.catalog
        items = []
        for model_id in catalog.ids():
            model = catalog.find(model_id)
            items.append(
                {
                    "title": model_id,
                    "model_name": model_id,
                    "hash": None,
                    "sha256": None,
                    "filename": model.path if model else model_id,
                    "config": None,
                }
            )
        return JSONResponse(items)

    async def samplers(self, request: Request) -> Response:
        await principal_of(request, self.auth, basic=True)
        return JSONResponse([{"name": name, "aliases": [], "options": {}} for name in a1111_sampler_names()])

    async def schedulers(self, request: Request) -> Response:
        await principal_of(request, self.auth, basic=True)
        return JSONResponse(
            [
                {"name": name, "label": label, "aliases": None, "default_rho": -1, "need_inner_model": False}
                for name, label in SCHEDULES.items()
            ]
        )

    async def upscalers(self, request: Request) -> Response:
        await principal_of(request, self.auth, basic=True)
        names = self.ingress.resources.upscalers.names()
        items: list[dict[str, Any]] = [
            {"name": "None", "model_name": None, "model_path": None, "scale": 1},
            {"name": "Lanczos", "model_name": None, "model_path": None, "scale": 4},
        ]
        for name in names:
            path = self.ingress.resources.upscalers.path(name)
            scale = 2 if "x2" in name.lower() else 4
            items.append({"name": name, "model_name": name, "model_path": str(path), "model_url": None, "scale": scale})
        return JSONResponse(items)

    async def latent_upscale_modes(self, request: Request) -> Response:
        await principal_of(request, self.auth, basic=True)
        return JSONResponse([{"name": "Latent"}])  # bilinear, A1111's default; its other modes map to it

    async def sd_vae(self, request: Request) -> Response:
        await principal_of(request, self.auth, basic=True)
        vaes = self.ingress.catalog.default.vaes  # the configured VAEs (every model may use each)
        return JSONResponse([{"model_name": name, "filename": source} for name, source in vaes.items()])

    async def loras(self, request: Request) -> Response:
        await principal_of(request, self.auth, basic=True)
        installed = self.ingress.resources.loras.installed()
        return JSONResponse([{"name": i.name, "alias": i.name, "path": i.path, "metadata": {}} for i in installed])

    async def prompt_styles(self, request: Request) -> Response:
        await principal_of(request, self.auth, basic=True)
        styles = self.ingress.resources.styles.all()
        return JSONResponse(
            [{"name": s.name, "prompt": s.prompt, "negative_prompt": s.negative_prompt} for s in styles]
        )

    async def scripts(self, request: Request) -> Response:
        await principal_of(request, self.auth, basic=True)
        return JSONResponse({"txt2img": ["controlnet"], "img2img": ["controlnet"]})

    async def embeddings(self, request: Request) -> Response:
        """The textual-inversion embeddings prompts can name, in A1111's shape (files that are not SDXL
        embeddings under `skipped`)."""
        await principal_of(request, self.auth, basic=True)
        catalog = self.ingress.resources.embeddings
        return JSONResponse(await anyio.to_thread.run_sync(catalog.a1111_listing))

    async def cmd_flags(self, request: Request) -> Response:
        await principal_of(request, self.auth, basic=True)
        return JSONResponse({"api": True, "nowebui": True, "ckpt": self.ingress.model.path, "lora_dir": None})


def _parsed(text: str) -> dict[str, Any]:
    """A1111's `parse_generation_parameters`, for what our infotext holds: Prompt, Negative prompt, each
    parameter, and WxH values split into `<key>-1` and `<key>-2`."""
    if not text:
        return {}
    prompt, negative, params = parse_infotext(text)
    parsed: dict[str, Any] = {"Prompt": prompt, "Negative prompt": negative}
    for key, value in params.items():
        size = re.fullmatch(r"(\d+)x(\d+)", value)
        if size:
            parsed[f"{key}-1"], parsed[f"{key}-2"] = size[1], size[2]
        else:
            parsed[key] = value
    return parsed


def _multiple_of_8(side: int) -> int:
    return max(8, side // 8 * 8)


def _parameters(data: bytes) -> str:
    with Image.open(io.BytesIO(data)) as image:
        return read_parameters(image) or ""


def _inverted(mask: str) -> str:
    """A1111's inpainting_mask_invert: the mask's black repaints instead of its white."""
    return mask_as_ours(decode_inline(mask, field="mask"), lambda image: ImageOps.invert(image.convert("L")))
