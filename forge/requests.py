"""What a client may ask for (validated where bytes come in) and the fully resolved spec that is stored."""

from __future__ import annotations

from typing import Annotated, Literal, get_args

import msgspec
from msgspec import Meta

SchedulerName = Literal["euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "unipc", "ddim"]
OutputFormat = Literal["png", "webp", "jpeg"]
Tiling = Literal["none", "x", "y", "both"]

MAX_SEED = 2**32 - 1
# Hard ceilings; the configured and per-model bounds are checked by ingress.
Side = Annotated[int, Meta(ge=8, le=4096, multiple_of=8, description="pixels, a multiple of 8")]
Name = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
ModelId = Annotated[str, Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")]
ControlType = Literal["openpose", "depth", "canny"]
MAX_STYLES = 8
MAX_CONTROLS = 3
MAX_IMAGES = 8  # images one request may ask for


class LoraRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A LoRA from `GET /v1/loras` and how strongly it applies (0 leaves the base model as it is)."""

    name: Name
    weight: Annotated[float, Meta(ge=-4, le=4)] = 1.0


ImageInput = Annotated[
    str,
    Meta(
        min_length=1,
        description="an upload id from POST /v1/uploads, or the image itself in base64 (a data: URL is fine)",
    ),
]
InpaintArea = Literal["whole", "masked"]
ReferenceMode = Literal["full", "style", "composition"]
MAX_REFERENCES = 16  # the type's ceiling; the configured max_references is checked by ingress


class ReferenceRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A reference image (IP-Adapter): the character's identity and look, its style, or its composition."""

    image: ImageInput
    strength: Annotated[float, Meta(ge=0, le=1, description="0 leaves the image as it is without the reference")] = 0.6
    mode: Annotated[
        ReferenceMode,
        Meta(description="full: identity and look; style: colours and rendering only; composition: layout only"),
    ] = "full"
    start: Annotated[float, Meta(ge=0, le=1, description="fraction of the steps where the reference begins")] = 0.0
    end: Annotated[float, Meta(ge=0, le=1, description="fraction of the steps where the reference ends")] = 1.0


class ControlRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Guide the composition with a ControlNet: a pose, a depth map or the edges of an image."""

    type: ControlType
    image: (
        Annotated[
            str,
            Meta(
                min_length=1,
                description="an upload id from POST /v1/uploads, or the image itself in base64 (a data: URL is fine)",
            ),
        ]
        | None
    ) = None
    pose: Annotated[Name, Meta(description="openpose only: a built-in pose template, see GET /v1/poses")] | None = None
    preprocess: (
        Annotated[
            bool,
            Meta(
                description="canny: find edges in the image (default on); depth: estimate depth from a photo "
                "(default off: the image is a depth map); openpose: not available (give a pose image or template)"
            ),
        ]
        | None
    ) = None
    strength: Annotated[float, Meta(ge=0, le=2, description="conditioning scale")] = 0.8
    start: Annotated[float, Meta(ge=0, le=1, description="fraction of the steps where control begins")] = 0.0
    end: Annotated[float, Meta(ge=0, le=1, description="fraction of the steps where control ends")] = 1.0


PALETTE_NAMES = ("pico-8", "nes", "game-boy", "endesga-32", "sweetie-16", "cga", "grayscale-4")
MAX_VIEWS = 16


class ViewRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One image of a sheet: the same character and seed, with its own words and pose."""

    label: Annotated[Name, Meta(description="names the image in the sprite sheet's frames")]
    prompt: Annotated[str, Meta(max_length=500, description="added to the prompt for this image")] = ""
    pose: Annotated[Name, Meta(description="a pose template (GET /v1/poses) for openpose control")] | None = None


HexColor = Annotated[str, Meta(pattern=r"^#[0-9a-fA-F]{6}$", description="#rrggbb")]


class PixelArtRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Snap to a pixel grid: downscale by `factor`, reduce colours, optionally outline, scale back up."""

    factor: Annotated[int, Meta(ge=1, le=64, description="source pixels per art pixel")] = 8
    colors: Annotated[int, Meta(ge=2, le=256, description="colours to keep (when no palette)")] | None = None
    palette: Annotated[str, Meta(description=f"a named palette: {', '.join(PALETTE_NAMES)}")] | None = None
    outline: Annotated[bool, Meta(description="a one-pixel outline around the character (needs transparency)")] = False


class ResizeRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    width: Annotated[int, Meta(ge=1, le=8192)]
    height: Annotated[int, Meta(ge=1, le=8192)]
    mode: Annotated[
        Literal["fit", "fill", "pad", "stretch"],
        Meta(description="fit inside, fill and crop, fit and pad to the size, or stretch"),
    ] = "pad"


class SpriteSheetRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Pack the task's images into one atlas with a TexturePacker "hash" JSON frame map."""

    columns: Annotated[int, Meta(ge=1, le=64)] | None = None
    padding: Annotated[int, Meta(ge=0, le=64)] = 2


class PostprocessRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Steps run in this order on every image: upscale, remove background, trim, pixel art, resize."""

    upscale: Literal[2, 4] | None = None
    upscaler: Annotated[Name, Meta(description="a model in models/upscalers, see GET /v1/postprocess")] | None = None
    remove_background: bool = False
    background_model: Annotated[Name, Meta(description="a model in models/rembg")] | None = None
    trim: Annotated[bool, Meta(description="crop to the character (needs remove_background)")] = False
    trim_padding: Annotated[int, Meta(ge=0, le=512)] = 8
    pixel_art: PixelArtRequest | None = None
    resize: ResizeRequest | None = None
    sprite_sheet: SpriteSheetRequest | None = None
    matte: Annotated[HexColor, Meta(description="JPEG: transparent parts are flattened onto this colour")] = "#ffffff"
    quality: Annotated[int, Meta(ge=1, le=100, description="WebP and JPEG quality")] = 95
    lossless: Annotated[bool, Meta(description="WebP: lossless")] = False


class HiresRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The hires fix: the image made at its size, upscaled, then repainted at the larger size (img2img), in one
    task. The size comes from `scale`, or from `width` and/or `height` (one alone keeps the aspect; both: the
    image is scaled to cover them and cropped, as A1111 does)."""

    scale: Annotated[float, Meta(ge=1, le=8, description="times the size (2 when no width or height)")] | None = None
    width: Annotated[Side, Meta(description="the final width instead of scale")] | None = None
    height: Annotated[Side, Meta(description="the final height instead of scale")] | None = None
    upscaler: Annotated[
        str,
        Meta(
            min_length=1,
            max_length=64,
            description="latent: the latents are interpolated; lanczos: the image is resized; or an upscaler model "
            "from GET /v1/postprocess",
        ),
    ] = "latent"
    steps: Annotated[int, Meta(ge=0, le=150, description="second-pass steps; 0 or absent: the first pass's")] | None = (
        None
    )
    denoise: Annotated[float, Meta(ge=0, le=1, description="how much of the upscaled image is repainted")] = 0.7


class HiresSpec(msgspec.Struct, frozen=True, kw_only=True):
    """The hires fix resolved: the final size, the size upscaled to before A1111's crop, and the steps run."""

    upscaler: str
    width: int
    height: int
    upscale_width: int
    upscale_height: int
    steps: int
    denoise: float
    scale: float | None = None  # as asked (the infotext's Hires upscale); None: width/height were asked
    asked_steps: int = 0  # 0: the first pass's (the infotext writes Hires steps only when asked)


AnimationAction = Literal["idle", "walk", "run", "attack", "jump"]
MIN_FRAMES, MAX_FRAMES = 4, 12


class AnimationRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """An animation cycle as one task: a frame per pose, in 1, 4 or 8 directions, every frame from one seed;
    the result adds a sprite sheet (a row per direction), an animation per direction and two atlases."""

    action: (
        Annotated[AnimationAction, Meta(description="a built-in cycle, posed from one 3D skeleton per direction")]
        | Annotated[
            list[Name],
            Meta(
                min_length=MIN_FRAMES,
                max_length=MAX_FRAMES,
                description="pose templates from GET /v1/poses, one per frame (one direction)",
            ),
        ]
    ) = "walk"
    directions: Annotated[Literal[1, 4, 8], Meta(description="1: S; 4: S, W, N, E; 8: also SW, NW, NE, SE")] = 4
    frames: (
        Annotated[int, Meta(ge=MIN_FRAMES, le=MAX_FRAMES, description="frames per cycle (6 when absent)")] | None
    ) = None
    frame_size: (
        Annotated[int, Meta(ge=16, le=512, description="each frame scaled into a square cell of this size")] | None
    ) = None
    frame_ms: Annotated[int, Meta(ge=20, le=2000, description="how long each frame shows")] = 100
    format: Annotated[Literal["gif", "webp"], Meta(description="the animation file of each direction")] = "gif"

    @property
    def frame_count(self) -> int:
        return len(self.action) if isinstance(self.action, list) else self.frames or 6


VariationMode = Literal["random", "combinatorial", "off"]
GridField = Literal["prompt", "negative_prompt", "seed", "steps", "guidance_scale", "scheduler", "clip_skip"]
GRID_FIELDS: tuple[str, ...] = get_args(GridField)
MAX_GRID_SIDE = 8
GridValue = Annotated[str, Meta(max_length=1000)] | int | float


class GridAxis(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One axis of a prompt matrix: a field and the values it takes. For prompt and negative_prompt, the
    first value is text of the prompt and each value replaces it in turn (A1111's Prompt S/R)."""

    field: GridField
    values: Annotated[list[GridValue], Meta(min_length=1, max_length=MAX_GRID_SIDE)]


class GridRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A prompt matrix: an image for every combination of the axes' values (row by row: y, then x) in one
    task, plus one labelled grid image."""

    x: GridAxis
    y: GridAxis | None = None


class GenerationRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A request to generate character images. Omitted fields take the model's defaults."""

    prompt: Annotated[str, Meta(min_length=1, max_length=100_000, description="what to draw")]
    negative_prompt: Annotated[str, Meta(max_length=100_000, description="what to avoid")] = ""
    style: (
        Annotated[Name, Meta(description="a style from GET /v1/styles")]
        | Annotated[list[Name], Meta(max_length=MAX_STYLES, description="styles stacked, first innermost")]
        | None
    ) = None
    loras: Annotated[list[LoraRequest], Meta(description="LoRAs on top of the style's own")] = []
    control: ControlRequest | Annotated[list[ControlRequest], Meta(max_length=MAX_CONTROLS)] | None = None
    model: Annotated[ModelId, Meta(description="a model id from GET /v1/models; the default when absent")] | None = None
    postprocess: Annotated[PostprocessRequest, Meta(description="replaces the style's post-processing")] | None = None
    width: Side | None = None
    height: Side | None = None
    num_images: Annotated[int, Meta(ge=1, le=MAX_IMAGES, description="images from one prompt")] = 1
    steps: Annotated[int, Meta(ge=1, le=150, description="denoising steps")] | None = None
    guidance_scale: Annotated[float, Meta(ge=0, le=30, description="classifier-free guidance")] | None = None
    seed: Annotated[int, Meta(ge=0, le=MAX_SEED, description="random when absent; image k uses seed+k")] | None = None
    scheduler: SchedulerName | None = None
    clip_skip: (
        Annotated[
            int,
            Meta(
                ge=1,
                le=12,
                description="the text encoders' layer the prompt is read from, counted from the end as A1111 and "
                "ComfyUI count it (1: the last; 2: the penultimate, SDXL's own); absent: the model's default",
            ),
        ]
        | None
    ) = None
    guidance_rescale: (
        Annotated[
            float,
            Meta(ge=0, le=1, description="rescales guided predictions (zero-SNR models); absent: the model's default"),
        ]
        | None
    ) = None
    vae: (
        Annotated[
            Name,
            Meta(description="a VAE from GET /v1/models' vaes; Automatic: the model's default; None: its own VAE"),
        ]
        | None
    ) = None
    hires: Annotated[HiresRequest, Meta(description="the hires fix: a second pass at a larger size")] | None = None
    tiling: Annotated[
        Tiling,
        Meta(description="seamless tiles: the image wraps around left to right (x), top to bottom (y) or both"),
    ] = "none"
    tile_preview: Annotated[
        bool, Meta(description="with tiling: also a preview of each image repeated 3 times along its tiled axes")
    ] = False
    variations: Annotated[
        VariationMode,
        Meta(
            description="{a|b} choices and __name__ wildcards in the prompt: random (each image's seed picks), "
            "combinatorial (the combinations in order, one per image) or off (the prompt as written)"
        ),
    ] = "random"
    grid: Annotated[GridRequest, Meta(description="a prompt matrix: one image per combination")] | None = None
    output_format: OutputFormat = "png"
    priority: Annotated[int, Meta(ge=-10, le=10, description="higher runs first")] = 0
    init_image: (
        Annotated[ImageInput, Meta(description="img2img: start from this image; sizes follow it when omitted")] | None
    ) = None
    strength: Annotated[float, Meta(ge=0, le=1, description="img2img: how much of the image is repainted")] = 0.6
    mask: (
        Annotated[ImageInput, Meta(description="inpainting: white repaints, black keeps (any size; needs init_image)")]
        | None
    ) = None
    mask_blur: Annotated[int, Meta(ge=0, le=64, description="inpainting: feathering of the mask's edge, in pixels")] = 4
    inpaint_area: Annotated[
        InpaintArea,
        Meta(description="whole: repaint at the image's size; masked: a padded crop around the mask at full size"),
    ] = "whole"
    inpaint_padding: Annotated[int, Meta(ge=0, le=512, description="masked: pixels around the mask's box")] = 32
    references: Annotated[
        list[ReferenceRequest],
        Meta(max_length=MAX_REFERENCES, description="reference images (IP-Adapter); a character's are used when empty"),
    ] = []
    ip_adapter: (
        Annotated[Name, Meta(description="the IP-Adapter for the references (GET /v1/models); the first when absent")]
        | None
    ) = None
    views: Annotated[
        list[ViewRequest],
        Meta(max_length=MAX_VIEWS, description="a sheet: one image per view, all from one seed (num_images is 1)"),
    ] = []
    animation: Annotated[AnimationRequest, Meta(description="an animation cycle: its frames are the images")] | None = (
        None
    )
    character: (
        Annotated[
            str,
            Meta(
                pattern=r"^(ch_[0-9a-f]{32}|[A-Za-z0-9][A-Za-z0-9._-]{0,63})$",
                description="a character from GET /v1/characters (id or name): its description and defaults apply",
            ),
        ]
        | None
    ) = None


class CharacterUsed(msgspec.Struct, frozen=True, kw_only=True):
    """Which character (and which version of it) a generation used."""

    id: str
    name: str
    version: int


def work_of(width: int, height: int, steps: int, hires: HiresSpec | None) -> int:
    """Pixel-steps of one image: what the work budget counts."""
    return width * height * steps + (hires.width * hires.height * hires.steps if hires else 0)


class ImageVariant(msgspec.Struct, frozen=True, kw_only=True):
    """What one image of a task has of its own: its prompts with their variations chosen, and a grid cell's
    settings. Every field is the image's value, equal to the task's where the image does not differ."""

    prompt: str
    negative_prompt: str
    styled_prompt: str
    styled_negative_prompt: str
    seed: int
    steps: int
    guidance_scale: float
    scheduler: SchedulerName
    clip_skip: int | None = None
    hires: HiresSpec | None = None


class GridSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A prompt matrix resolved: images are row by row (y, then x); labels as the grid image shows them."""

    x: GridAxis
    y: GridAxis | None = None

    @property
    def columns(self) -> int:
        return len(self.x.values)


class GenerationSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A request with every default filled in: exactly what the engine runs and what metadata records."""

    prompt: str
    negative_prompt: str
    styles: list[str]
    width: int
    height: int
    num_images: int
    steps: int
    guidance_scale: float
    seed: int
    scheduler: SchedulerName
    output_format: OutputFormat
    priority: int
    model: str
    # What the pipeline is given once styles are applied (the prompt fields above are the user's own).
    styled_prompt: str
    styled_negative_prompt: str
    loras: list[LoraRequest] = []
    control: list[ControlRequest] = []
    postprocess: PostprocessRequest | None = None
    # img2img and inpainting (upload ids); strength is recorded only with an init image.
    init_image: str | None = None
    strength: float | None = None
    mask: str | None = None
    mask_blur: int = 0
    inpaint_area: InpaintArea = "whole"
    inpaint_padding: int = 0
    character: CharacterUsed | None = None
    references: list[ReferenceRequest] = []  # images as upload ids
    ip_adapter: str | None = None  # set whenever there are references
    views: list[ViewRequest] = []  # a sheet: num_images is their number, and every image has the seed
    animation: AnimationRequest | None = None  # its frames are the views, direction by direction
    # Clip skip (see GenerationRequest); None: recorded before it was, which is the model's default.
    clip_skip: int | None = None
    guidance_rescale: float = 0.0
    vae: str | None = None  # a configured VAE's name; None: the model's own
    hires: HiresSpec | None = None  # the images come out at hires.width x hires.height
    tiling: Tiling = "none"  # the axes the images wrap around on (seamless tiles)
    tile_preview: bool = False
    variations: VariationMode = "random"
    # Images that differ from the task in prompt or settings (variations chosen, grid cells): one per image.
    variants: list[ImageVariant] = []
    grid: GridSpec | None = None

    @property
    def seeds(self) -> list[int]:
        if self.variants:
            return [variant.seed for variant in self.variants]
        if self.views:
            return [self.seed] * len(self.views)
        return [(self.seed + k) % (MAX_SEED + 1) for k in range(self.num_images)]

    def image_spec(self, index: int) -> GenerationSpec:
        """The spec image `index` was made with: the task's, with that image's own prompts and settings."""
        if not self.variants:
            return self
        variant = self.variants[index]
        return msgspec.structs.replace(
            self, **{field: getattr(variant, field) for field in variant.__struct_fields__}, variants=[], grid=None
        )

    def prompt_of(self, index: int) -> str:
        """The user's prompt as image `index` got it (its variations chosen, a grid cell's replacement made)."""
        return self.variants[index].prompt if self.variants else self.prompt

    def prompt_for(self, index: int) -> str:
        """What image `index` was drawn from: its styled prompt, with its view's words on a sheet."""
        styled = self.variants[index].styled_prompt if self.variants else self.styled_prompt
        words = self.views[index].prompt if self.views else ""
        return f"{styled}, {words}" if words else styled
