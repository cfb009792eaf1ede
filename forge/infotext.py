"""Generation parameters in AUTOMATIC1111's "infotext" format, which A1111, ComfyUI and civitai read."""

from __future__ import annotations

import json

from engines.schedulers import SAMPLERS
from forge import __version__
from forge.requests import ControlRequest, GenerationSpec, ViewRequest


def _quote(value: str) -> str:
    # A1111 quotes a value only when it holds a separator of the parameter line.
    if any(ch in value for ch in ',\n:"'):
        return json.dumps(value, ensure_ascii=False)
    return value


def _control(control: ControlRequest) -> str:
    source = f"pose {control.pose}" if control.pose else "image"
    return f"{control.type} ({source}) {control.strength:g} [{control.start:g}-{control.end:g}]"


def _view(view: ViewRequest) -> str:
    return f"{view.label} (openpose pose {view.pose})" if view.pose else view.label


def _hires(spec: GenerationSpec) -> dict[str, object | None]:
    """A1111's hires-fix parameters (`StableDiffusionProcessingTxt2Img.init` and `calculate_target_resolution`):
    `Hires upscale` or `Hires resize`, `Hires steps` when asked for, `Hires upscaler`, `Denoising strength`."""
    hires = spec.hires
    if hires is None:
        return {}
    upscaler = {"latent": "Latent", "lanczos": "Lanczos"}.get(hires.upscaler, hires.upscaler)
    return {
        "Denoising strength": f"{hires.denoise:g}",
        "Hires upscale": f"{hires.scale:g}" if hires.scale is not None else None,
        "Hires resize": f"{hires.width}x{hires.height}" if hires.scale is None else None,
        "Hires steps": hires.asked_steps or None,
        "Hires upscaler": upscaler,
    }


def infotext(
    task: GenerationSpec, seed: int, model_name: str, postprocess: list[str] | None = None, index: int = 0
) -> str:
    """Image `index`'s parameters: its own prompt and settings where the task's images differ, with the prompt
    as written as `Template` (as A1111's Dynamic Prompts extension writes it) when variations were chosen."""
    spec = task.image_spec(index)
    sampler = SAMPLERS[spec.scheduler]
    params: dict[str, object | None] = {
        "Steps": spec.steps,
        "Sampler": sampler.a1111_sampler,
        "Schedule type": sampler.a1111_schedule,
        "CFG scale": f"{spec.guidance_scale:g}",
        "Seed": seed,
        "Size": f"{spec.width}x{spec.height}",
        "Model": model_name,
        "Styles": ", ".join(spec.styles) or None,
        "Character": f"{spec.character.name} (v{spec.character.version})" if spec.character else None,
        "LoRAs": ", ".join(f"{lora.name}:{lora.weight:g}" for lora in spec.loras) or None,
        "ControlNet": ", ".join(_control(c) for c in spec.control) or None,
        "View": _view(spec.views[index]) if spec.views else None,
        "IP-Adapter": spec.ip_adapter if spec.references else None,
        "References": ", ".join(
            f"{reference.mode} {reference.strength:g} [{reference.start:g}-{reference.end:g}]"
            for reference in spec.references
        )
        or None,
        "VAE": spec.vae,
        "Denoising strength": f"{spec.strength:g}" if spec.strength is not None else None,
        "Mask blur": spec.mask_blur if spec.mask is not None else None,
        "Inpaint area": ("Only masked" if spec.inpaint_area == "masked" else "Whole picture") if spec.mask else None,
        # Our clip skip counts as A1111's CLIP_stop_at_last_layers does; written even at SDXL's default (2), so
        # the number read back is the one the image was made with.
        "Clip skip": spec.clip_skip,
        **_hires(spec),
        # A1111 writes "Tiling: True" (both axes, its only kind); one axis is written as its name.
        "Tiling": {"none": None, "both": "True"}.get(spec.tiling, spec.tiling),
        "Postprocess": "; ".join(postprocess or []) or None,
        "Template": task.prompt if spec.prompt != task.prompt and task.grid is None else None,
        "Negative Template": task.negative_prompt
        if spec.negative_prompt != task.negative_prompt and task.grid is None
        else None,
        "Version": f"chara-forge {__version__}",
    }
    lines = [spec.prompt_for(index)]
    if spec.styled_negative_prompt:
        lines.append(f"Negative prompt: {spec.styled_negative_prompt}")
    lines.append(", ".join(f"{key}: {_quote(str(value))}" for key, value in params.items() if value is not None))
    return "\n".join(lines)


def parse_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, parameters): the inverse of `infotext`, for tests and re-use of settings."""
    *head, last = text.split("\n")
    negative_marker = "Negative prompt: "
    prompt_lines = [line for line in head if not line.startswith(negative_marker)]
    negative = next((line[len(negative_marker) :] for line in head if line.startswith(negative_marker)), "")
    params: dict[str, str] = {}
    key, value, in_quotes, buffer = "", "", False, ""
    for ch in last + ",":
        if ch == '"':
            in_quotes = not in_quotes
            buffer += ch
        elif ch == ":" and not in_quotes and not key:
            key, buffer = buffer.strip(), ""
        elif ch == "," and not in_quotes:
            value = buffer.strip()
            params[key] = json.loads(value) if value.startswith('"') else value
            key, buffer = "", ""
        else:
            buffer += ch
    return "\n".join(prompt_lines), negative, params
