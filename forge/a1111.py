"""AUTOMATIC1111's `/sdapi/v1` requests, and what they mean here: ordinary generation requests.

Clients send many fields A1111 has and we do not (face restoration, subseeds, ...): unknown fields
are ignored, as A1111 ignores them. What a field asks for that we cannot do is refused by name, never
silently replaced by a default (an unknown sampler is a 422 naming `sampler_name`).
"""

from __future__ import annotations

import re
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from engines.schedulers import SAMPLERS
from forge.errors import InvalidRequest
from forge.requests import MAX_IMAGES, SchedulerName

A1111_DEFAULT_SIZE = 512  # A1111's width and height when a request leaves them out
LORA_TAG = re.compile(r"<lora:([^:>]+)(?::([-+]?\d*\.?\d+))?(?::[^>]*)?>", re.IGNORECASE)
# Schedules (A1111's "scheduler") this server has: automatic picks the sampler's usual one; uniform and normal
# are the plain noise schedule.
SCHEDULES = {"automatic": "Automatic", "karras": "Karras", "uniform": "Uniform", "normal": "Normal"}


class A1111Request(msgspec.Struct, kw_only=True):
    """txt2img and img2img bodies: the fields that change what is generated (others are ignored)."""

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int = -1
    sampler_name: str | None = None
    sampler_index: str | None = None
    scheduler: str | None = None
    batch_size: Annotated[int, Meta(ge=1, le=MAX_IMAGES)] = 1
    n_iter: Annotated[int, Meta(ge=1, le=64)] = 1
    steps: Annotated[int, Meta(ge=1, le=150)] | None = None
    cfg_scale: Annotated[float, Meta(ge=0, le=30)] | None = None
    width: Annotated[int, Meta(ge=8, le=4096)] | None = None
    height: Annotated[int, Meta(ge=8, le=4096)] | None = None
    enable_hr: bool = False
    hr_scale: Annotated[float, Meta(ge=1, le=8)] = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: Annotated[int, Meta(ge=0, le=150)] = 0
    hr_resize_x: Annotated[int, Meta(ge=0, le=4096)] = 0
    hr_resize_y: Annotated[int, Meta(ge=0, le=4096)] = 0
    tiling: bool | None = None  # seamless tiles on both axes (our `tiling: both`)
    override_settings: dict[str, Any] | None = None
    alwayson_scripts: dict[str, Any] | None = None
    # img2img
    init_images: list[str] | None = None
    mask: str | None = None
    denoising_strength: Annotated[float, Meta(ge=0, le=1)] | None = None
    mask_blur: Annotated[int, Meta(ge=0, le=64)] | None = None
    inpaint_full_res: bool | int = False
    inpaint_full_res_padding: Annotated[int, Meta(ge=0, le=512)] = 32
    inpainting_mask_invert: int = 0


HIRES_DENOISE = 0.75  # A1111's txt2img denoising_strength when a request leaves it out
# The hires fix's fields, as A1111 names them, for error messages.
HIRES_FIELDS = {
    "hires": "enable_hr",
    "hires.scale": "hr_scale",
    "hires.width": "hr_resize_x",
    "hires.height": "hr_resize_y",
    "hires.upscaler": "hr_upscaler",
    "hires.steps": "hr_second_pass_steps",
    "hires.denoise": "denoising_strength",
}


def hires_upscaler(name: str | None) -> str:
    """Our hires upscaler for A1111's `hr_upscaler`: its latent modes ("Latent", "Latent (bicubic)", ...) are
    latent upscaling (bilinear, A1111's default mode); "None" and "Lanczos" resize the image; any other name is
    an upscaler model's, checked against those installed."""
    if name is None or name.strip().lower().startswith("latent"):
        return "latent"
    if name.strip().lower() in ("none", "lanczos"):
        return "lanczos"
    return name


def hires_fields(given: A1111Request) -> dict[str, Any]:
    """enable_hr and its fields as our `hires` (hr_resize_x/y, when given, instead of hr_scale)."""
    hires: dict[str, Any] = {
        "upscaler": hires_upscaler(given.hr_upscaler),
        "steps": given.hr_second_pass_steps,
        "denoise": HIRES_DENOISE if given.denoising_strength is None else given.denoising_strength,
    }
    if given.hr_resize_x or given.hr_resize_y:
        for name, side in (("width", given.hr_resize_x), ("height", given.hr_resize_y)):
            if side:
                hires[name] = max(8, side // 8 * 8)  # A1111's latents floor the side to a multiple of 8
    else:
        hires["scale"] = given.hr_scale
    return hires


def a1111_sampler_names() -> list[str]:
    return list(dict.fromkeys(spec.a1111_sampler for spec in SAMPLERS.values()))


def scheduler_for(sampler: str | None, schedule: str | None) -> SchedulerName | None:
    """Our sampler for A1111's sampler and schedule ("DPM++ 2M Karras" is "DPM++ 2M" with "Karras")."""
    if not sampler:
        return None
    name = sampler.strip()
    if name.lower().endswith(" karras"):
        name, schedule = name[: -len(" karras")], "karras"
    wanted = (schedule or "automatic").strip().lower()
    if wanted in ("", "n/a", "none"):
        wanted = "automatic"
    if wanted not in SCHEDULES:
        raise InvalidRequest(
            f"unknown scheduler {schedule!r}; this server has {', '.join(SCHEDULES)}", field="scheduler", rule="enum"
        )
    matches = {spec.a1111_schedule: key for key, spec in SAMPLERS.items() if spec.a1111_sampler.lower() == name.lower()}
    if not matches:
        raise InvalidRequest(
            f"unknown sampler {sampler!r}; this server has {', '.join(a1111_sampler_names())}",
            field="sampler_name",
            rule="enum",
        )
    if wanted == "karras":
        if "Karras" not in matches:
            raise InvalidRequest(f"{sampler!r} has no Karras schedule here", field="scheduler", rule="enum")
        return matches["Karras"]  # type: ignore[return-value]
    if wanted in ("uniform", "normal"):
        return matches.get(None, next(iter(matches.values())))  # type: ignore[return-value]
    return matches.get("Karras", matches.get(None))  # type: ignore[return-value]


def loras_in_prompt(prompt: str) -> tuple[str, list[dict[str, Any]]]:
    """`<lora:name:weight>` tags out of the prompt, as LoRA requests (weight 1 when left out)."""
    loras = [{"name": m[1].strip(), "weight": float(m[2]) if m[2] else 1.0} for m in LORA_TAG.finditer(prompt)]
    text = re.sub(r"\s*,\s*,", ",", LORA_TAG.sub("", prompt)).strip(" ,")
    return text, loras


def control_units(scripts: dict[str, Any] | None) -> tuple[list[dict[str, Any]], list[str]]:
    """The ControlNet extension's units as our `control`, and a warning for each always-on script we ignore."""
    controls: list[dict[str, Any]] = []
    warnings = []
    for name, script in (scripts or {}).items():
        if name.lower() != "controlnet":
            warnings.append(f"always-on script {name!r} is not supported here and was ignored")
            continue
        args = script.get("args", []) if isinstance(script, dict) else []
        for index, unit in enumerate(args):
            if not isinstance(unit, dict) or unit.get("enabled") is False:
                continue
            image = unit.get("image") or unit.get("input_image")
            if isinstance(image, dict):  # some versions send {image, mask}
                image = image.get("image")
            if not image:
                continue
            field = f"alwayson_scripts.ControlNet.args[{index}]"
            module, model = str(unit.get("module") or "none"), str(unit.get("model") or "")
            kind = next((k for k in ("openpose", "depth", "canny") if k in f"{model} {module}".lower()), None)
            if kind is None:
                raise InvalidRequest(
                    f"ControlNet model {model!r} is not one this server has (openpose, depth or canny)",
                    field=f"{field}.model",
                    rule="enum",
                )
            controls.append(
                {
                    "type": kind,
                    "image": image,
                    "preprocess": module.lower() not in ("none", ""),
                    "strength": float(unit.get("weight", 1.0)),
                    "start": float(unit.get("guidance_start", 0.0)),
                    "end": float(unit.get("guidance_end", 1.0)),
                }
            )
    return controls, warnings
