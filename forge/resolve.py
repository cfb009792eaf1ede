"""Turn a validated request into a complete spec: the model's defaults, and the limits that depend on it."""

from __future__ import annotations

import dataclasses
import secrets
from dataclasses import dataclass

import msgspec

from engines.poses import POSE_NAMES, is_pose
from forge.animation import with_animation
from forge.content_filter import PromptFilter
from forge.embeddings import EmbeddingCatalog
from forge.engine import ModelInfo
from forge.errors import InvalidRequest
from forge.image_variants import grid_spec, with_variations
from forge.loras import LoraCatalog
from forge.model_files import ModelFiles
from forge.prompt_syntax import check_weights
from forge.requests import (
    MAX_SEED,
    PALETTE_NAMES,
    CharacterUsed,
    ControlRequest,
    GenerationRequest,
    GenerationSpec,
    HiresRequest,
    HiresSpec,
    LoraRequest,
    PostprocessRequest,
    ReferenceRequest,
    SchedulerName,
    work_of,
)
from forge.styles import NO_STYLE, Style, StyledPrompt, StyleRegistry, apply_styles
from forge.variations import PromptVariations

DEFAULT_SCHEDULER: SchedulerName = "euler"


SIZE_PRESETS = ("square", "portrait", "landscape")


def round8(value: float) -> int:
    """The nearest multiple of 8 (at least 8): a side SDXL takes."""
    return max(8, round(value / 8) * 8)


def preset_size(model: ModelInfo, preset: str) -> tuple[int, int] | None:
    """(width, height) for a named preset at the model's native area (SDXL: 832x1216 portrait)."""
    side = model.default_size
    long, short = round8(side * 1.1875), round8(side * 0.8125)
    sizes = {"square": (side, side), "portrait": (short, long), "landscape": (long, short)}
    if preset not in sizes:
        return None
    width, height = sizes[preset]
    return max(width, model.min_size), max(height, model.min_size)


@dataclass(frozen=True)
class BackendLimits:
    """What the serving backend cannot do, checked when a request arrives so the task never fails for it."""

    backend: str
    loras: bool = True
    control: bool = True
    references: bool = True
    tiling: bool = True  # circular padding in the UNet's and VAE's convolutions
    min_side: int = 0
    max_side: int = 1 << 30


@dataclass(frozen=True)
class Resources:
    """What requests may refer to besides the model: styles and installed LoRAs, plus the configured limits."""

    styles: StyleRegistry
    loras: LoraCatalog
    max_prompt_chars: int
    max_loras: int
    upscalers: ModelFiles
    background_models: ModelFiles
    default_upscaler: str
    default_background_model: str
    max_output_pixels: int
    prompt_filter: PromptFilter | None = None
    max_work: int = 0  # width x height x images x steps; 0: no limit
    backend: BackendLimits = BackendLimits("eager")
    max_references: int = 4
    # IP-Adapters configured but not on this machine (hub ones not fetched yet); filled in at start.
    missing_ip_adapters: set[str] = dataclasses.field(default_factory=set)
    # Textual-inversion embeddings prompts may name (the engines load them; listed by /sdapi/v1/embeddings).
    embeddings: EmbeddingCatalog = dataclasses.field(default_factory=lambda: EmbeddingCatalog(None))
    # Expands {a|b} and __wildcard__ prompts (wildcard files in the data folder's wildcards/).
    variations: PromptVariations = dataclasses.field(default_factory=lambda: PromptVariations(None))


def requested_styles(request: GenerationRequest) -> list[str]:
    if request.style is None:
        return []
    names = [request.style] if isinstance(request.style, str) else request.style
    return [name for name in names if name != NO_STYLE]


def requested_controls(request: GenerationRequest) -> list[tuple[str, ControlRequest]]:
    """(field prefix for errors, control) in request order."""
    if request.control is None:
        return []
    if isinstance(request.control, ControlRequest):
        return [("control", request.control)]
    return [(f"control[{index}]", control) for index, control in enumerate(request.control)]


def view_controls(request: GenerationRequest) -> list[tuple[str, ControlRequest]]:
    """(field prefix for errors, control) for each view of a sheet that has a pose: openpose control."""
    return [
        (f"views[{index}]", ControlRequest(type="openpose", pose=view.pose))
        for index, view in enumerate(request.views)
        if view.pose is not None
    ]


def _styles(request: GenerationRequest, styles: StyleRegistry) -> list[Style]:
    found = []
    for name in requested_styles(request):
        style = styles.get(name)
        if style is None:
            raise InvalidRequest(
                f"unknown style {name!r}; GET /v1/styles lists them", field="style", rule="unknown_style"
            )
        found.append(style)
    return found


def check_control(control: ControlRequest, model: ModelInfo, field: str) -> None:
    if control.type not in model.controlnets:
        raise InvalidRequest(
            f"no {control.type} ControlNet is installed for model {model.id!r} "
            f"(set FORGE_CONTROLNET_{control.type.upper()} to its folder or hub id)",
            field=f"{field}.type",
            rule="controlnet_missing",
        )
    if control.start >= control.end:
        raise InvalidRequest("start must be below end", field=f"{field}.start", rule="range")
    if control.pose is not None:
        if control.type != "openpose":
            raise InvalidRequest("pose templates are for openpose control", field=f"{field}.pose", rule="invalid")
        if control.image is not None:
            raise InvalidRequest("give either image or pose, not both", field=f"{field}.pose", rule="exclusive")
        if not is_pose(control.pose):
            raise InvalidRequest(
                f"unknown pose {control.pose!r}; known poses: {', '.join(POSE_NAMES)}",
                field=f"{field}.pose",
                rule="unknown_pose",
            )
    elif control.image is None:
        needs = "an image or a pose template" if control.type == "openpose" else "an image"
        raise InvalidRequest(f"{control.type} control needs {needs}", field=f"{field}.image", rule="required")
    if control.type == "openpose" and control.preprocess:
        raise InvalidRequest(
            "there is no pose detector: give a pose image or a template", field=f"{field}.preprocess", rule="invalid"
        )
    if control.type == "depth" and control.preprocess and model.depth_model is None:
        raise InvalidRequest(
            "depth estimation needs a depth model (set FORGE_DEPTH_MODEL); or give a depth map",
            field=f"{field}.preprocess",
            rule="depth_model_missing",
        )


def _with_default_preprocess(control: ControlRequest) -> ControlRequest:
    if control.preprocess is not None:
        return control
    return msgspec.structs.replace(control, preprocess=control.type == "canny")


def _loras(request: GenerationRequest, styled: StyledPrompt, resources: Resources) -> list[LoraRequest]:
    if len(request.loras) > resources.max_loras:
        raise InvalidRequest(f"at most {resources.max_loras} LoRAs per request", field="loras", rule="max_length")
    for index, lora in enumerate(request.loras):
        if resources.loras.path(lora.name) is None:
            raise InvalidRequest(
                resources.loras.missing_message(lora.name), field=f"loras[{index}].name", rule="lora_missing"
            )
    for lora in styled.loras:
        if resources.loras.path(lora.name) is None:
            raise InvalidRequest(
                f"the style needs a LoRA that is not installed. {resources.loras.missing_message(lora.name)}",
                field="style",
                rule="lora_missing",
            )
    merged = {lora.name: lora for lora in styled.loras}
    merged.update({lora.name: lora for lora in request.loras})  # the request's weight wins
    return list(merged.values())


def _check_backend_support(
    request: GenerationRequest,
    loras: list[LoraRequest],
    controls: list[tuple[str, ControlRequest]],
    limits: BackendLimits,
) -> None:
    if loras and not limits.loras:
        raise InvalidRequest(
            f"this server's {limits.backend} backend bakes the weights into its engines and cannot apply LoRAs",
            field="loras" if request.loras else "style",
            rule="unsupported",
        )
    if controls and not limits.control:
        raise InvalidRequest(
            f"this server's {limits.backend} backend cannot take ControlNet control",
            field=controls[0][0],
            rule="unsupported",
        )
    if request.tiling != "none" and not limits.tiling:
        raise InvalidRequest(
            f"this server's {limits.backend} backend bakes its convolutions' padding into its engines and cannot "
            "make seamless tiles",
            field="tiling",
            rule="unsupported",
        )


def check_prompt_weights(request: GenerationRequest, styled: StyledPrompt) -> None:
    """Emphasis weights within forge.prompt_syntax's bounds: the request's own prompts first, so the error
    names the field the caller wrote; then what the styles made of them and each view's words."""
    check_weights(request.prompt, "prompt")
    check_weights(request.negative_prompt, "negative_prompt")
    check_weights(styled.prompt, "style")
    check_weights(styled.negative_prompt, "style")
    for index, view in enumerate(request.views):
        check_weights(f"{styled.prompt}, {view.prompt}", f"views[{index}].prompt")


def check_views(request: GenerationRequest, model: ModelInfo) -> None:
    """A sheet's views bring their own poses, and are the images: no control, init image or num_images."""
    if not request.views:
        return
    for field_name, given in (("control", request.control), ("init_image", request.init_image)):
        if given is not None:
            raise InvalidRequest(f"views do not combine with {field_name}", field=field_name, rule="exclusive")
    if request.num_images != 1:
        raise InvalidRequest("a sheet makes one image per view", field="num_images", rule="exclusive")
    for field, control in view_controls(request):
        check_control(control, model, field)


def check_reference_count(request: GenerationRequest, resources: Resources) -> None:
    if len(request.references) > resources.max_references:
        raise InvalidRequest(
            f"at most {resources.max_references} reference images per request on this server",
            field="references",
            rule="max_length",
        )


def check_references(
    request: GenerationRequest, model: ModelInfo, resources: Resources
) -> tuple[list[ReferenceRequest], str | None]:
    """The references and the IP-Adapter that applies them, or a 422 naming the field at fault."""
    references = request.references
    if not references:
        if request.ip_adapter is not None:
            raise InvalidRequest("ip_adapter applies reference images: give references too", field="ip_adapter")
        return [], None
    if not resources.backend.references:
        raise InvalidRequest(
            f"this server's {resources.backend.backend} backend cannot take reference images",
            field="references",
            rule="unsupported",
        )
    check_reference_count(request, resources)
    for index, reference in enumerate(references):
        if reference.end <= reference.start:
            raise InvalidRequest("end must be after start", field=f"references[{index}].end", rule="range")
    if not model.ip_adapters:
        raise InvalidRequest(
            f"no IP-Adapter is installed for {model.id}: set ip_adapters in the configuration",
            field="references",
            rule="not_installed",
        )
    name = request.ip_adapter or next(iter(model.ip_adapters))
    field_name = "ip_adapter" if request.ip_adapter else "references"
    if name not in model.ip_adapters:
        known = ", ".join(model.ip_adapters)
        raise InvalidRequest(
            f"no IP-Adapter {name!r} for {model.id} (installed: {known})", field="ip_adapter", rule="not_installed"
        )
    if name in resources.missing_ip_adapters:
        source = model.ip_adapters[name]
        raise InvalidRequest(
            f"the IP-Adapter {name!r} is not on this server yet: {source.weight_name} from {source.source} "
            "is fetched at start when the hub answers",
            field=field_name,
            rule="not_installed",
        )
    return list(references), name


def _installed(files: ModelFiles, what: str, name: str, field: str) -> str:
    if files.path(name) is None:
        raise InvalidRequest(files.missing_message(what, name), field=field, rule="model_missing")
    return name


def check_postprocess(
    options: PostprocessRequest, resources: Resources, width: int, height: int, field: str
) -> PostprocessRequest:
    """Validate the steps against what is installed and fill in the model names used."""
    art = options.pixel_art
    if art is not None:
        if art.palette is not None and art.colors is not None:
            raise InvalidRequest(
                "give colors or palette, not both", field=f"{field}.pixel_art.palette", rule="exclusive"
            )
        if art.palette is not None and art.palette not in PALETTE_NAMES:
            raise InvalidRequest(
                f"unknown palette {art.palette!r}; known palettes: {', '.join(PALETTE_NAMES)}",
                field=f"{field}.pixel_art.palette",
                rule="unknown_palette",
            )
        if art.outline and not options.remove_background:
            raise InvalidRequest(
                "an outline follows the character's edge: it needs remove_background",
                field=f"{field}.pixel_art.outline",
                rule="needs_transparency",
            )
    if options.trim and not options.remove_background:
        raise InvalidRequest(
            "trim crops to the character: it needs remove_background", field=f"{field}.trim", rule="needs_transparency"
        )
    upscaler = options.upscaler
    if options.upscale:
        upscaler = _installed(
            resources.upscalers, "upscaler", upscaler or resources.default_upscaler, f"{field}.upscaler"
        )
        if width * height * options.upscale**2 > resources.max_output_pixels:
            raise InvalidRequest(
                f"{width}x{height} upscaled x{options.upscale} is over {resources.max_output_pixels} pixels",
                field=f"{field}.upscale",
                rule="max_pixels",
            )
    background = options.background_model
    if options.remove_background:
        name = background or resources.default_background_model
        background = _installed(resources.background_models, "background model", name, f"{field}.background_model")
    return msgspec.structs.replace(options, upscaler=upscaler, background_model=background)


AUTOMATIC_VAE, OWN_VAE = "automatic", "none"
HIRES_UPSCALERS = ("latent", "lanczos")  # besides the installed upscaler models


def check_vae(name: str | None, model: ModelInfo) -> str | None:
    """The VAE a request gets: absent or Automatic, the model's default; None, the model's own; else a
    configured one."""
    if name is None or name.lower() == AUTOMATIC_VAE:
        return model.vae
    if name.lower() == OWN_VAE:
        return None
    if name not in model.vaes:
        known = ", ".join(["Automatic", "None", *model.vaes])
        raise InvalidRequest(f"unknown VAE {name!r}; this server has {known}", field="vae", rule="unknown_vae")
    return name


def check_hires(
    request: GenerationRequest,
    hires: HiresRequest,
    resources: Resources,
    size: tuple[int, int],
    sides: tuple[int, int],
    steps: int,
    controls: list[tuple[str, ControlRequest]],
) -> HiresSpec:
    """The hires fix's sizes and steps, as A1111 computes them (`calculate_target_resolution`): `scale` times
    the size, floored to multiples of 8; or the given width and/or height (one alone keeps the aspect; both: the
    image is scaled to cover them, then cropped). `sides`: the smallest and largest side allowed."""
    for name, given in (
        ("init_image", request.init_image),
        ("control", controls or None),
        ("views", request.views or None),
        ("references", request.references or None),
    ):
        if given is not None:
            raise InvalidRequest(f"the hires fix does not combine with {name}", field="hires", rule="exclusive")
    if hires.scale is not None and (hires.width is not None or hires.height is not None):
        raise InvalidRequest("give scale, or width and height, not both", field="hires.scale", rule="exclusive")
    upscaler = hires.upscaler
    if upscaler.lower() in HIRES_UPSCALERS:
        upscaler = upscaler.lower()
    elif resources.upscalers.path(upscaler) is None:
        raise InvalidRequest(
            f"{resources.upscalers.missing_message('upscaler', upscaler)}; or use latent or lanczos",
            field="hires.upscaler",
            rule="model_missing",
        )
    width, height = size
    field = "hires.scale"
    if hires.width is None and hires.height is None:
        scale = 2.0 if hires.scale is None else hires.scale
        up_width, up_height = int(width * scale), int(height * scale)
        final = up_width // 8 * 8, up_height // 8 * 8
    else:
        field = "hires.width" if hires.width is not None else "hires.height"
        if hires.height is None:
            assert hires.width is not None
            up_width, up_height = hires.width, hires.width * height // width
            final = up_width, up_height // 8 * 8
        elif hires.width is None:
            up_width, up_height = hires.height * width // height, hires.height
            final = up_width // 8 * 8, up_height
        else:
            final = hires.width, hires.height
            if width / height < hires.width / hires.height:
                up_width, up_height = hires.width, hires.width * height // width
            else:
                up_width, up_height = hires.height * width // height, hires.height
        scale = None
    smallest, largest = sides
    for side in (*final, up_width, up_height):
        if not smallest <= side <= largest:
            raise InvalidRequest(
                f"the hires fix makes {final[0]}x{final[1]} (from {up_width}x{up_height}); sides must be between "
                f"{smallest} and {largest} on this server",
                field=field,
                rule="range",
            )
    return HiresSpec(
        upscaler=upscaler,
        width=final[0],
        height=final[1],
        upscale_width=up_width // 8 * 8,
        upscale_height=up_height // 8 * 8,
        steps=hires.steps or steps,
        denoise=hires.denoise,
        scale=scale,
        asked_steps=hires.steps or 0,
    )


def size_from_image(size: tuple[int, int], smallest: int, largest: int) -> tuple[int, int]:
    """An init image's size brought within the model's sides (its aspect kept) in multiples of 8."""
    width, height = size
    scale = min(1.0, largest / max(width, height))
    scale = max(scale, smallest / min(width, height))
    return tuple(min(largest, max(smallest, round(side * scale / 8) * 8)) for side in (width, height))  # type: ignore[return-value]


def resolve_request(
    request: GenerationRequest,
    model: ModelInfo,
    resources: Resources,
    init_size: tuple[int, int] | None = None,
    character: CharacterUsed | None = None,
) -> GenerationSpec:
    """Apply styles and defaults; check every name against what is installed; choose each image's prompt
    variations and make a prompt matrix's cells. Raises InvalidRequest. `init_size`: the init image's size,
    which width and height follow when the request omits them."""
    request = with_animation(request)

    def resolve(one: GenerationRequest) -> GenerationSpec:
        return _resolve_task(one, model, resources, init_size, character)

    spec = resolve(request)
    styles = _styles(request, resources.styles)  # a grid's cells have the request's
    if request.grid is not None:
        return grid_spec(request, request.grid, spec, resolve, styles, resources)
    return with_variations(spec, styles, resources)


def _resolve_task(
    request: GenerationRequest,
    model: ModelInfo,
    resources: Resources,
    init_size: tuple[int, int] | None,
    character: CharacterUsed | None,
) -> GenerationSpec:
    if not request.prompt.strip():
        raise InvalidRequest("prompt must not be blank", field="prompt", rule="min_length")
    limit = resources.max_prompt_chars
    for field, text in (("prompt", request.prompt), ("negative_prompt", request.negative_prompt)):
        if len(text) > limit:
            raise InvalidRequest(f"{field} is longer than {limit} characters", field=field, rule="max_length")
    if resources.prompt_filter is not None:  # before any GPU work, on every interface
        resources.prompt_filter.check("prompt", request.prompt)
    styles = _styles(request, resources.styles)
    styled = apply_styles(styles, request.prompt, request.negative_prompt)
    check_prompt_weights(request, styled)
    loras = _loras(request, styled, resources)
    controls = requested_controls(request)
    if not controls and styled.control is not None and not request.views:  # views bring their own poses
        controls = [("style", styled.control)]
    for field, control in controls:
        check_control(control, model, field)
    _check_backend_support(request, loras, [*controls, *view_controls(request)], resources.backend)
    references, ip_adapter = check_references(request, model, resources)

    check_views(request, model)
    if request.mask is not None and request.init_image is None:
        raise InvalidRequest(
            "a mask repaints part of an init_image: give init_image too", field="mask", rule="requires"
        )
    defaults = styled.defaults
    smallest = max(model.min_size, resources.backend.min_side)
    largest = min(model.max_size, resources.backend.max_side)
    preset = preset_size(model, defaults.size) if defaults.size else None
    if init_size is not None and request.width is None and request.height is None:
        preset = size_from_image(init_size, smallest, largest)
    width = request.width or (preset[0] if preset else model.default_size)
    height = request.height or (preset[1] if preset else model.default_size)
    for field, side in (("width", width), ("height", height)):
        if not smallest <= side <= largest:
            raise InvalidRequest(
                f"{field} must be between {smallest} and {largest} for {model.id} on this server",
                field=field,
                rule="range",
            )
    steps = request.steps or defaults.steps or model.default_steps
    hires = None
    if request.hires is not None:
        hires = check_hires(request, request.hires, resources, (width, height), (smallest, largest), steps, controls)
    out_width, out_height = (hires.width, hires.height) if hires else (width, height)  # what post-processing gets
    postprocess = None
    if request.postprocess is not None:
        postprocess = check_postprocess(request.postprocess, resources, out_width, out_height, "postprocess")
    elif styled.postprocess is not None:
        postprocess = check_postprocess(styled.postprocess, resources, out_width, out_height, "style")
    images, images_field = (len(request.views), "views") if request.views else (request.num_images, "num_images")
    if request.animation is not None:
        images_field = "animation.frames"
    if resources.max_work and work_of(width, height, steps, hires) * images > resources.max_work:
        raise InvalidRequest(
            f"{width}x{height} x {images} images x {steps} steps is over this server's budget of "
            f"{resources.max_work} pixel-steps per request; ask for fewer {images_field.rsplit('.', 1)[-1]}, "
            "steps or pixels",
            field=images_field,
            rule="budget",
        )
    guidance = request.guidance_scale
    if guidance is None:
        guidance = model.default_guidance if defaults.guidance_scale is None else defaults.guidance_scale
    return GenerationSpec(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        styles=[style.name for style in styles],
        width=width,
        height=height,
        num_images=images,
        steps=steps,
        guidance_scale=guidance,
        seed=secrets.randbelow(MAX_SEED + 1) if request.seed is None else request.seed,
        scheduler=request.scheduler or defaults.scheduler or DEFAULT_SCHEDULER,
        output_format=request.output_format,
        priority=request.priority,
        model=model.id,
        styled_prompt=styled.prompt,
        styled_negative_prompt=styled.negative_prompt,
        loras=loras,
        control=[_with_default_preprocess(control) for _, control in controls],
        postprocess=postprocess,
        init_image=request.init_image,
        strength=request.strength if request.init_image is not None else None,
        mask=request.mask,
        mask_blur=request.mask_blur if request.mask is not None else 0,
        inpaint_area=request.inpaint_area if request.mask is not None else "whole",
        inpaint_padding=request.inpaint_padding if request.mask is not None else 0,
        character=character,
        references=references,
        ip_adapter=ip_adapter,
        views=request.views,
        animation=request.animation,
        clip_skip=model.clip_skip if request.clip_skip is None else request.clip_skip,
        guidance_rescale=model.guidance_rescale if request.guidance_rescale is None else request.guidance_rescale,
        vae=check_vae(request.vae, model),
        hires=hires,
        tiling=request.tiling,
        tile_preview=check_tile_preview(request),
        variations=request.variations,
    )


def check_tile_preview(request: GenerationRequest) -> bool:
    if request.tile_preview and request.tiling == "none":
        raise InvalidRequest(
            "a tile preview repeats a seamless tile: ask for tiling x, y or both", field="tile_preview", rule="requires"
        )
    return request.tile_preview
