"""The hires fix and configured VAEs: what the eager engine and the step loop share.

The hires fix follows A1111 (`StableDiffusionProcessingTxt2Img.sample_hr_pass`): the first pass's latents are
upscaled (`latent`: interpolated bilinearly, A1111's default "Latent" mode; otherwise decoded, upscaled as an
image and encoded again), cropped to the final size, then repainted by an img2img pass whose noise comes from
fresh generators seeded with the image's seed. A1111 runs exactly the second-pass steps asked for, whatever the
denoising strength; diffusers runs `int(n * strength)` of an `n`-step schedule, so `n` is chosen to match.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image

from forge.engine import Hires

LATENT, LANCZOS = "latent", "lanczos"
LATENT_FACTOR = 8  # image pixels per latent pixel (SDXL's VAE)


def second_pass_schedule(steps: int, denoise: float) -> tuple[int, int]:
    """(steps to ask the img2img pipeline for, steps it then runs): it runs `steps` when `denoise` allows any."""
    if denoise <= 0:
        return 0, 0
    asked = max(steps, int(steps / denoise))
    while min(int(asked * denoise), asked) < steps:  # float rounding: 4 / 0.7 * 0.7 can fall below 4
        asked += 1
    return asked, min(int(asked * denoise), asked)


def load_vae(source: str, like: Any, device: str) -> Any:
    """A configured VAE: a diffusers folder (its config.json beside the weights, or in vae/) or one single file
    (described by the model's own VAE config), in the model's VAE dtype on `device`."""
    from diffusers import AutoencoderKL

    path = Path(source).expanduser()
    dtype = like.dtype
    if path.is_file():
        vae = AutoencoderKL.from_single_file(str(path), config=_config_folder(like), dtype=dtype)
    elif (path / "vae" / "config.json").is_file():
        vae = AutoencoderKL.from_pretrained(str(path), subfolder="vae", dtype=dtype)
    else:
        vae = AutoencoderKL.from_pretrained(str(path), dtype=dtype)
    vae.enable_slicing()
    return vae.to(device)


def _config_folder(vae: Any) -> str:
    """Where the model's own VAE config was read from: single-file VAEs take their architecture from it."""
    folder = getattr(vae.config, "_name_or_path", "") or ""
    return str(folder)


def _latent_statistics(config: Any, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The VAE's latent mean and standard deviation, where its config has them, on the latents' device."""
    if getattr(config, "latents_mean", None) is None or getattr(config, "latents_std", None) is None:
        return None
    mean = torch.tensor(config.latents_mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
    std = torch.tensor(config.latents_std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
    return mean, std


def scaled_for_vae(config: Any, latents: torch.Tensor) -> torch.Tensor:
    """Denoised latents as the VAE decodes them (the pipeline's own unscaling)."""
    if (statistics := _latent_statistics(config, latents)) is not None:
        mean, std = statistics
        scaled: torch.Tensor = latents * std / config.scaling_factor + mean
        return scaled
    unscaled: torch.Tensor = latents / config.scaling_factor
    return unscaled


def decode(pipe: Any, latents: torch.Tensor) -> list[Image.Image]:
    """Decode as the pipeline does at the end of its call: an fp16 VAE that asks for it runs in fp32 for the
    decode, then goes back to fp16 (the engine's VAE is shared)."""
    vae = pipe.vae
    upcast = vae.dtype == torch.float16 and vae.config.force_upcast
    try:
        with torch.inference_mode():
            if upcast:
                vae.to(dtype=torch.float32)
            decoded = vae.decode(scaled_for_vae(vae.config, latents.to(vae.dtype)), return_dict=False)[0]
            images: list[Image.Image] = pipe.image_processor.postprocess(decoded, output_type="pil")
            return images
    finally:
        if upcast:
            vae.to(dtype=torch.float16)


def _encode(pipe: Any, images: list[Image.Image], dtype: torch.dtype) -> torch.Tensor:
    """Images to scaled latents (the distribution's mean, so the result does not depend on a generator)."""
    vae = pipe.vae
    upcast = vae.dtype == torch.float16 and vae.config.force_upcast
    try:
        with torch.inference_mode():
            if upcast:
                vae.to(dtype=torch.float32)
            pixels = pipe.image_processor.preprocess(images).to(device=vae.device, dtype=vae.dtype)
            latents = vae.encode(pixels).latent_dist.mode()
    finally:
        if upcast:
            vae.to(dtype=torch.float16)
    config = vae.config
    latents = latents.to(dtype)
    if (statistics := _latent_statistics(config, latents)) is not None:
        mean, std = statistics
        shifted: torch.Tensor = (latents - mean) * config.scaling_factor / std
        return shifted
    scaled: torch.Tensor = latents * config.scaling_factor
    return scaled


def upscaled_latents(pipe: Any, latents: torch.Tensor, hires: Hires, upscaler: Any = None) -> torch.Tensor:
    """The first pass's latents at the hires size. `upscaler`: the loaded model (engines.upscale.Upscaler) when
    `hires.upscaler` names a file."""
    size = (hires.upscale_height // LATENT_FACTOR, hires.upscale_width // LATENT_FACTOR)
    if hires.upscaler == LATENT:
        with torch.inference_mode():
            larger = torch.nn.functional.interpolate(latents, size=size, mode="bilinear", antialias=False)
    else:
        target = (hires.upscale_width, hires.upscale_height)
        images = []
        for image in decode(pipe, latents):
            if upscaler is not None:
                factor = max(1, -(-target[0] // image.width))  # the model's factor, then Lanczos to the size
                image = upscaler(image, factor)
            images.append(image.resize(target, Image.Resampling.LANCZOS) if image.size != target else image)
        larger = _encode(pipe, images, latents.dtype)
    return crop(larger, hires)


def crop(latents: torch.Tensor, hires: Hires) -> torch.Tensor:
    """A1111's crop when both final sides were given: the centre of the cover-scaled latents."""
    cut_y = (hires.upscale_height - hires.height) // LATENT_FACTOR
    cut_x = (hires.upscale_width - hires.width) // LATENT_FACTOR
    height, width = latents.shape[2], latents.shape[3]
    return latents[:, :, cut_y // 2 : height - (cut_y + 1) // 2, cut_x // 2 : width - (cut_x + 1) // 2].contiguous()
