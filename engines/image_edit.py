"""img2img and inpainting: the init image and mask at the request's size, the diffusers pipeline that repaints
them (sharing the base pipeline's weights), and the init image pasted back outside the mask.

Inpainting with a base UNet repaints through the VAE, which shifts pixels it was not asked to touch; the
init image is pasted back outside the mask after decoding, as A1111 does, so every pixel outside the mask
is the init image's. The blur feathers the mask's edge inward only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from diffusers import (
    StableDiffusionXLControlNetImg2ImgPipeline,
    StableDiffusionXLControlNetInpaintPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
)
from PIL import Image, ImageChops, ImageFilter

from forge.engine import ImageEdit


@dataclass(frozen=True)
class EditImages:
    init: Image.Image  # RGB, at the request's size
    mask: Image.Image | None  # L: 255 repaints, 0 keeps (binary)
    feathered: Image.Image | None  # L: the mask blurred, zero outside it


def load_edit_images(edit: ImageEdit, width: int, height: int) -> EditImages:
    with Image.open(edit.init_image) as opened:
        init = opened.convert("RGB").resize((width, height), Image.Resampling.LANCZOS)
    if edit.mask is None:
        return EditImages(init, None, None)
    with Image.open(edit.mask) as opened:
        gray = opened.convert("L").resize((width, height), Image.Resampling.LANCZOS)
    mask = gray.point(lambda value: 255 if value > 127 else 0)
    feathered = mask
    if edit.mask_blur:
        feathered = ImageChops.multiply(mask.filter(ImageFilter.GaussianBlur(edit.mask_blur)), mask)
    return EditImages(init, mask, feathered)


def nothing_to_repaint(edit: ImageEdit, steps: int) -> bool:
    """diffusers runs int(steps x strength) steps: none at all leaves the init image as it is."""
    return int(steps * edit.strength) < 1


def edit_pipeline(
    components: dict[str, Any],
    controlnets: list[Any],
    images: EditImages,
    edit: ImageEdit,
    inpainting_unet: Any = None,
) -> tuple[Any, dict[str, Any]]:
    """The pipeline for this edit and the call arguments that are its own. `inpainting_unet`: a 9-channel
    UNet that repaints a masked image (else the base UNet inpaints)."""
    arguments: dict[str, Any] = {"image": images.init, "strength": edit.strength}
    if images.mask is not None:
        if inpainting_unet is not None:
            components = {**components, "unet": inpainting_unet}
        arguments["mask_image"] = images.mask
        if edit.inpaint_area == "masked":  # a padded crop around the mask, repainted at the full size
            arguments["padding_mask_crop"] = edit.inpaint_padding
        if controlnets:
            return StableDiffusionXLControlNetInpaintPipeline(**components, controlnet=controlnets), arguments
        return StableDiffusionXLInpaintPipeline(**components), arguments
    if controlnets:
        return StableDiffusionXLControlNetImg2ImgPipeline(**components, controlnet=controlnets), arguments
    return StableDiffusionXLImg2ImgPipeline(**components), arguments


def takes_size(pipe: Any) -> bool:
    """SDXL's plain img2img pipeline takes its size from the image (and refuses width and height)."""
    return not isinstance(pipe, StableDiffusionXLImg2ImgPipeline)


def keep_outside_mask(result: Image.Image, images: EditImages) -> Image.Image:
    if images.feathered is None:
        return result
    return Image.composite(result.convert("RGB"), images.init, images.feathered)
