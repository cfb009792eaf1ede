"""Gradio web UI: an adapter like REST and MCP, on its own port, in the same process and event loop."""

from __future__ import annotations

import base64
import csv
import io
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import gradio as gr
from PIL import Image
from starlette.applications import Starlette

from actors.encoding import png_base64
from actors.files import DirectoryFiles, Files
from actors.hub import Events
from actors.ingress import Ingress
from actors.postprocess import ANIMATION_PREFIX, GRID_IMAGE
from engines.animation_poses import ACTIONS, DIRECTIONS
from engines.poses import POSE_NAMES
from engines.schedulers import SAMPLERS
from forge.auth import Authenticator, Principal
from forge.characters import (
    MAX_CHARACTER_REFERENCES,
    CharacterAnimationRequest,
    CharacterCreate,
    CharacterSheetRequest,
    animation_generation,
    sheet_generation,
)
from forge.errors import ForgeError
from forge.events import TERMINAL_EVENTS, Progress
from forge.requests import (
    GRID_FIELDS,
    MAX_FRAMES,
    MAX_IMAGES,
    MIN_FRAMES,
    PALETTE_NAMES,
    GenerationRequest,
    GenerationSpec,
    GridSpec,
    HiresSpec,
    PostprocessRequest,
)
from forge.resolve import HIRES_UPSCALERS, SIZE_PRESETS, preset_size
from forge.tasks import TaskRecord, TaskState
from forge.validation import convert
from protocols.identity import visible_owner

HISTORY_LIMIT = 48


NO_POSE = "none"
NO_GRID_AXIS = "off"
NO_PIXEL_ART = "off"
FREE_PALETTE = "16 colours"
AUTOMATIC_VAE_LABEL, OWN_VAE_LABEL = "Automatic", "None"  # the model's default VAE, and its own


def _postprocess_fields(
    upscale: str, remove_background: bool, trim: bool, palette: str, factor: int, outline: bool, sheet: bool
) -> dict[str, Any]:
    """The request's `postprocess` object from the Game asset panel (empty: no post-processing)."""
    fields: dict[str, Any] = {}
    if upscale in ("2", "4"):
        fields["upscale"] = int(upscale)
    if remove_background:
        fields["remove_background"] = True
    if trim:
        fields["trim"] = True
    if palette != NO_PIXEL_ART:
        art: dict[str, Any] = {"factor": factor, "outline": outline}
        if palette != FREE_PALETTE:
            art["palette"] = palette
        fields["pixel_art"] = art
    if sheet:
        fields["sprite_sheet"] = {}
    return fields


def _model_fields(
    clip_skip: float, vae: str, hires_scale: float, hires_upscaler: str, hires_steps: float, hires_denoise: float
) -> dict[str, Any]:
    """The request fields of the Advanced panel's text-encoder, VAE and hires-fix controls."""
    fields: dict[str, Any] = {}
    if int(clip_skip) > 0:
        fields["clip_skip"] = int(clip_skip)
    if vae and vae != AUTOMATIC_VAE_LABEL:
        fields["vae"] = vae
    if hires_scale > 1:
        fields["hires"] = {
            "scale": float(hires_scale),
            "upscaler": hires_upscaler or HIRES_UPSCALERS[0],
            "steps": int(hires_steps),
            "denoise": float(hires_denoise),
        }
    return fields


def _grid_fields(x_field: str, x_values: str, y_field: str, y_values: str) -> dict[str, Any]:
    """The request's prompt matrix from the Prompt matrix panel: comma-separated values, as A1111's X/Y plot
    takes them (quote a value that holds a comma)."""
    axes = {}
    for name, field, values in (("x", x_field, x_values), ("y", y_field, y_values)):
        if field and field != NO_GRID_AXIS:
            axes[name] = {"field": field, "values": next(csv.reader([values or ""], skipinitialspace=True), [])}
    if "y" in axes and "x" not in axes:
        axes = {"x": axes["y"]}
    return {"grid": axes} if axes else {}


def _grid_settings(grid: GridSpec | None) -> list[Any]:
    """The Prompt matrix panel's values for a stored task."""
    settings: list[Any] = []
    for axis in [grid.x, grid.y] if grid is not None else [None, None]:
        if axis is None:
            settings += [NO_GRID_AXIS, ""]
        else:
            buffer = io.StringIO()
            csv.writer(buffer).writerow([str(value) for value in axis.values])
            settings += [axis.field, buffer.getvalue().strip()]
    return settings


def _hires_settings(hires: HiresSpec | None) -> list[Any]:
    """The hires controls' values for a stored task."""
    if hires is None:
        return [1, HIRES_UPSCALERS[0], 0, 0.7]
    scale = hires.scale if hires.scale is not None else hires.upscale_width / max(hires.width, 1)
    return [scale, hires.upscaler, hires.asked_steps, hires.denoise]


def _postprocess_settings(options: PostprocessRequest | None) -> list[Any]:
    """The Game asset panel's values for a stored task (the inverse of `_postprocess_fields`)."""
    if options is None:
        return ["off", False, False, NO_PIXEL_ART, 8, False, False]
    art = options.pixel_art
    palette = NO_PIXEL_ART if art is None else art.palette or FREE_PALETTE
    return [
        str(options.upscale) if options.upscale else "off",
        options.remove_background,
        options.trim,
        palette,
        art.factor if art else 8,
        bool(art and art.outline),
        options.sprite_sheet is not None,
    ]


NO_CHARACTER = "none"
REFERENCE_SLOTS = 2  # the generate handler takes each slot's image, strength and mode


def _gallery_images(value: list[Any] | None) -> list[Image.Image]:
    """A gallery's images (each item an image, or an (image, caption) pair)."""
    images = []
    for item in value or []:
        image = item[0] if isinstance(item, tuple | list) else item
        if isinstance(image, Image.Image):
            images.append(image)
        elif isinstance(image, str | Path):
            with Image.open(image) as opened:
                images.append(opened.convert("RGB"))
    return images


def _editor_background(value: Any) -> Image.Image | None:
    if not isinstance(value, dict):
        return None
    background = value.get("background")
    return background if isinstance(background, Image.Image) else None


def _edit_fields(value: Any, strength: float, inpaint_area: str) -> dict[str, Any]:
    """img2img from the image editor's picture; with paint on it, inpainting where it was painted."""
    background = _editor_background(value)
    if background is None:
        return {}
    fields: dict[str, Any] = {"init_image": png_base64(background.convert("RGB")), "strength": float(strength)}
    mask = Image.new("L", background.size, 0)
    for layer in value.get("layers") or []:
        if isinstance(layer, Image.Image):
            alpha = layer.convert("RGBA").getchannel("A").resize(background.size)
            mask.paste(255, mask=alpha.point(lambda a: 255 if a > 0 else 0))
    if mask.getbbox() is not None:
        fields |= {"mask": png_base64(mask), "inpaint_area": inpaint_area}
    return fields


def _reference_fields(slots: list[tuple[Image.Image | None, float, str]]) -> list[dict[str, Any]]:
    """The reference slots that hold an image."""
    references = []
    for image, strength, mode in slots:
        if isinstance(image, Image.Image):
            references.append({"image": png_base64(image.convert("RGB")), "strength": float(strength), "mode": mode})
    return references


def _ui_error(exc: ForgeError) -> gr.Error:
    """A refused request as the page shows it: the message, and the field it names."""
    where = f" ({exc.field})" if exc.field else ""
    return gr.Error(f"{exc.message}{where}", print_exception=False)


class WebUi:
    def __init__(self, *, ingress: Ingress, hub: Events, results: Files, data_dir: Path, auth: Authenticator) -> None:
        self._auth = auth
        self._logins: dict[str, Principal] = {}  # user name -> who logged in with it
        self._ingress = ingress
        self._hub = hub
        self._results = results
        # Files on a local disk are served by path (without owners); others are handed to Gradio by value.
        self._outputs = results.root if isinstance(results, DirectoryFiles) and not auth.enabled else None
        self._data_dir = data_dir
        self._session_tasks: dict[str, list[str]] = {}  # browser session -> its latest tasks, for Cancel
        self.blocks = self._build()

    def app(self) -> Starlette:
        """The UI mounted on a plain Starlette parent. Only generated images are served from disk."""
        root = Starlette()
        blocked = [self._data_dir / name for name in ("forge.sqlite3", "forge.sqlite3-wal", "forge.sqlite3-shm")]
        app: Starlette = gr.mount_gradio_app(
            root,  # type: ignore[arg-type]
            self.blocks,
            path="",
            # With owners, no output file is served by path (any logged-in user could ask for any path):
            # images are handed to Gradio by value and land in its cache under content hashes.
            allowed_paths=[] if self._outputs is None else [str(self._outputs)],
            blocked_paths=[str(path) for path in [*blocked, self._data_dir / "models"]],
            show_error=True,
            footer_links=["api"],
            auth=self._login if self._auth.enabled else None,
            auth_message="Your owner name, and an API key as the password.",
        )
        return app

    def _login(self, username: str, password: str) -> bool:
        try:
            principal = self._auth.from_token(password)
        except ForgeError:
            return False
        if principal.owner != username:
            return False
        self._logins[username] = principal
        return True

    def _principal(self, request: gr.Request) -> Principal:
        if not self._auth.enabled:
            return self._auth.local
        principal = self._logins.get(request.username or "")
        if principal is None:
            raise gr.Error("Please log in again.", print_exception=False)
        return principal

    def _owner(self, request: gr.Request) -> str | None:
        return visible_owner(self._principal(request))

    # -- layout --

    def _build(self) -> gr.Blocks:
        model = self._ingress.model
        with gr.Blocks(title="Chara Forge") as blocks:
            gr.Markdown("# Chara Forge\nDescribe a character; get game-ready art.")
            if model.is_tiny:
                gr.Markdown(
                    f"**Demo model in use** ({model.name}): random weights, so images are noise. "
                    "Set `FORGE_MODEL` to an SDXL model for real images."
                )
            with gr.Tab("Create"):
                prompt = gr.Textbox(
                    label="Character description",
                    lines=3,
                    elem_id="prompt",
                    placeholder="a fox ranger in a green cloak, full body, holding a longbow",
                )
                with gr.Row():
                    style = gr.Dropdown(
                        choices=self._ingress.resources.styles.names(),
                        value=[],
                        multiselect=True,
                        label="Style (pick several to stack them)",
                    )
                    character = gr.Dropdown(
                        choices=[NO_CHARACTER], value=NO_CHARACTER, label="Character", elem_id="character"
                    )
                    num_images = gr.Slider(1, MAX_IMAGES, value=1, step=1, label="Number of images")
                    batch = gr.Checkbox(value=False, label="Batch: one character per line")
                with gr.Accordion("Start from an image (img2img; paint over a part to inpaint it)", open=False):
                    init_image = gr.ImageEditor(
                        type="pil",
                        label="Image: what you paint over is repainted, the rest is kept",
                        brush=gr.Brush(colors=["#ffffff"], color_mode="fixed", default_size=24),
                        eraser=gr.Eraser(),
                        layers=False,
                        transforms=(),
                        elem_id="init-image",
                    )
                    with gr.Row():
                        strength = gr.Slider(0, 1, value=0.6, step=0.05, label="Strength (how much is repainted)")
                        inpaint_area = gr.Radio(
                            ["whole", "masked"], value="whole", label="Inpaint at (masked: the painted part, full size)"
                        )
                with gr.Accordion("Reference images (keep a character's look)", open=False):
                    reference_inputs = []
                    with gr.Row():
                        for number in range(1, REFERENCE_SLOTS + 1):
                            with gr.Column():
                                reference_inputs += [
                                    gr.Image(type="pil", label=f"Reference {number}", height=160),
                                    gr.Slider(0, 1, value=0.6, step=0.05, label="Strength"),
                                    gr.Radio(["full", "style", "composition"], value="full", label="Mode"),
                                ]
                with gr.Accordion("Advanced", open=False):
                    negative = gr.Textbox(label="Negative prompt", lines=2)
                    with gr.Row():
                        size = gr.Radio([*SIZE_PRESETS, "custom"], value="square", label="Size")
                        width = gr.Slider(
                            model.min_size, model.max_size, value=model.default_size, step=8, label="Width (custom)"
                        )
                        height = gr.Slider(
                            model.min_size, model.max_size, value=model.default_size, step=8, label="Height (custom)"
                        )
                    with gr.Row():
                        steps = gr.Slider(1, 150, value=model.default_steps, step=1, label="Steps")
                        guidance = gr.Slider(0, 30, value=model.default_guidance, step=0.5, label="Guidance")
                        scheduler = gr.Dropdown(choices=list(SAMPLERS), value="euler", label="Sampler")
                    with gr.Row():
                        base_model = gr.Dropdown(choices=self._ingress.catalog.ids(), value=model.id, label="Model")
                        pose = gr.Dropdown(choices=[NO_POSE, *POSE_NAMES], value=NO_POSE, label="Pose (openpose)")
                        loras = gr.Dropdown(
                            choices=self._lora_names(),
                            value=[],
                            multiselect=True,
                            label="LoRAs",
                        )
                        lora_weight = gr.Slider(-2, 2, value=0.8, step=0.05, label="LoRA weight")
                    with gr.Row():
                        random_seed = gr.Checkbox(value=True, label="Random seed")
                        seed = gr.Number(value=0, precision=0, minimum=0, label="Seed")
                        output_format = gr.Radio(["png", "webp", "jpeg"], value="png", label="Format")
                    with gr.Row():
                        clip_skip = gr.Slider(0, 12, value=0, step=1, label="Clip skip (0: the model's)")
                        vae = gr.Dropdown(
                            choices=[AUTOMATIC_VAE_LABEL, OWN_VAE_LABEL, *model.vaes],
                            value=AUTOMATIC_VAE_LABEL,
                            label="VAE",
                        )
                    with gr.Row():
                        hires_scale = gr.Slider(1, 4, value=1, step=0.05, label="Hires fix: upscale by (1: off)")
                        hires_upscaler = gr.Dropdown(
                            choices=[*HIRES_UPSCALERS, *self._ingress.resources.upscalers.names()],
                            value=HIRES_UPSCALERS[0],
                            label="Hires upscaler",
                        )
                        hires_steps = gr.Slider(0, 150, value=0, step=1, label="Hires steps (0: as the first pass)")
                        hires_denoise = gr.Slider(0, 1, value=0.7, step=0.05, label="Hires denoising strength")
                    with gr.Row():
                        tiling = gr.Radio(
                            ["none", "x", "y", "both"], value="none", label="Tiling (seamless: wraps around on)"
                        )
                        variations = gr.Radio(
                            ["random", "combinatorial", "off"],
                            value="random",
                            label="Prompt variations ({a|b} and __wildcard__): each image picks",
                        )
                with gr.Accordion("Prompt matrix", open=False):
                    with gr.Row():
                        grid_x_field = gr.Dropdown(
                            choices=[NO_GRID_AXIS, *GRID_FIELDS], value=NO_GRID_AXIS, label="X: field"
                        )
                        grid_x_values = gr.Textbox(label="X: values, comma-separated (prompt: the first is replaced)")
                    with gr.Row():
                        grid_y_field = gr.Dropdown(
                            choices=[NO_GRID_AXIS, *GRID_FIELDS], value=NO_GRID_AXIS, label="Y: field"
                        )
                        grid_y_values = gr.Textbox(label="Y: values, comma-separated")
                with gr.Accordion("Game asset", open=False):
                    with gr.Row():
                        upscale = gr.Radio(["off", "2", "4"], value="off", label="Upscale")
                        remove_background = gr.Checkbox(value=False, label="Remove background")
                        trim_box = gr.Checkbox(value=False, label="Trim to the character")
                        sprite_sheet = gr.Checkbox(value=False, label="Sprite sheet of the images")
                    with gr.Row():
                        pixel_palette = gr.Dropdown(
                            choices=[NO_PIXEL_ART, FREE_PALETTE, *PALETTE_NAMES], value=NO_PIXEL_ART, label="Pixel art"
                        )
                        pixel_factor = gr.Slider(2, 32, value=8, step=1, label="Pixel size")
                        outline = gr.Checkbox(value=False, label="Outline (with background removal)")
                with gr.Row():
                    generate = gr.Button("Generate", variant="primary", elem_id="generate")
                    cancel = gr.Button("Cancel", variant="stop")
                status = gr.Markdown("", elem_id="status")
                preview = gr.Image(label="Preview", type="pil", interactive=False, height=256)
                gallery = gr.Gallery(label="Result", columns=4, height=420, object_fit="contain", elem_id="gallery")
            with gr.Tab("History"):
                refresh = gr.Button("Refresh")
                history = gr.Gallery(label="Your generations", columns=6, allow_preview=False)
                details = gr.JSON(label="Parameters")
                selected = gr.Textbox(label="Selected generation", interactive=False)
                history_ids = gr.State([])
                with gr.Row():
                    reuse = gr.Button("Use these settings again")
                    same_seed = gr.Button("Same seed, new prompt")
                    as_reference = gr.Button("Add to a new character's references")
            with gr.Tab("Characters"):
                gr.Markdown("A character keeps its description, reference images and look across generations.")
                with gr.Row():
                    character_name = gr.Textbox(label="Name (letters, digits, . _ -)", elem_id="character-name")
                    character_description = gr.Textbox(label="Description (woven into every generation of it)", lines=2)
                character_references = gr.Gallery(
                    label="Reference images: upload them, or add them from History",
                    type="pil",
                    interactive=True,
                    columns=4,
                    height=200,
                )
                create_button = gr.Button("Save character", variant="primary")
                character_status = gr.Markdown("")
                character_table = gr.Dataframe(
                    headers=["name", "version", "description", "references"], interactive=False, wrap=True
                )
                with gr.Row():
                    sheet_character = gr.Dropdown(choices=[], label="Character")
                    sheet_kind = gr.Radio(["turnaround", "expressions"], value="turnaround", label="Sheet")
                    sheet_steps = gr.Slider(1, 150, value=model.default_steps, step=1, label="Steps")
                    sheet_button = gr.Button("Make sheet")
                sheet_status = gr.Markdown("")
                sheet_gallery = gr.Gallery(label="Sheet", columns=5, height=300, object_fit="contain")
            with gr.Tab("Animate"):
                gr.Markdown(
                    "An animation cycle of a saved character: every frame from one seed, posed from one 3D "
                    "skeleton turned to each direction. The task also keeps a sprite sheet and Aseprite and "
                    "Godot atlases (see its links in History or over REST)."
                )
                with gr.Row():
                    animate_character = gr.Dropdown(choices=[], label="Character", elem_id="animate-character")
                    animate_action = gr.Radio(list(ACTIONS), value="walk", label="Action")
                    animate_directions = gr.Radio([1, 4, 8], value=4, label="Directions")
                with gr.Row():
                    animate_frames = gr.Slider(MIN_FRAMES, MAX_FRAMES, value=6, step=1, label="Frames per cycle")
                    animate_steps = gr.Slider(1, 150, value=model.default_steps, step=1, label="Steps")
                    animate_button = gr.Button("Animate", variant="primary", elem_id="animate")
                animate_status = gr.Markdown("", elem_id="animate-status")
                animation = gr.Gallery(
                    label="Animation, a direction each",
                    columns=4,
                    height=300,
                    object_fit="contain",
                    elem_id="animation",
                )

            settings = [
                prompt,
                negative,
                style,
                num_images,
                size,
                width,
                height,
                steps,
                guidance,
                scheduler,
                random_seed,
                seed,
                output_format,
                base_model,
                pose,
                loras,
                lora_weight,
                upscale,
                remove_background,
                trim_box,
                pixel_palette,
                pixel_factor,
                outline,
                sprite_sheet,
                clip_skip,
                vae,
                hires_scale,
                hires_upscaler,
                hires_steps,
                hires_denoise,
                tiling,
                variations,
                grid_x_field,
                grid_x_values,
                grid_y_field,
                grid_y_values,
            ]
            generate.click(
                self.generate,
                inputs=[*settings, batch, character, init_image, strength, inpaint_area, *reference_inputs],
                outputs=[status, preview, gallery],
                api_name="generate",
            )
            create_button.click(
                self.create_character,
                inputs=[character_name, character_description, character_references],
                outputs=[character_status, character_table, character, sheet_character],
                api_name="create_character",
            )
            sheet_button.click(
                self.character_sheet,
                inputs=[sheet_character, sheet_kind, sheet_steps],
                outputs=[sheet_status, sheet_gallery],
                api_name="character_sheet",
            )
            animate_button.click(
                self.animate,
                inputs=[animate_character, animate_action, animate_directions, animate_frames, animate_steps],
                outputs=[animate_status, animation],
                api_name="animate",
            )
            create_button.click(self.character_names, outputs=[animate_character], api_name=False)
            blocks.load(self.character_names, outputs=[animate_character], api_name=False)
            as_reference.click(
                self.add_reference,
                inputs=[selected, character_references],
                outputs=[character_references],
                api_name="add_reference",
            )
            cancel.click(self.cancel, outputs=[status], api_name="cancel")
            refresh.click(self.history, outputs=[history, history_ids], api_name="history")
            history.select(self.select, inputs=[history_ids], outputs=[details, selected], api_name=False)
            reuse.click(self.reuse, inputs=[selected], outputs=settings, api_name="reuse")
            same_seed.click(
                self.same_seed, inputs=[selected], outputs=[prompt, random_seed, seed], api_name="same_seed"
            )
            blocks.load(self.history, outputs=[history, history_ids], api_name=False)
            # LoRA files dropped into the folder while the server runs show up on the next page load.
            blocks.load(self.lora_choices, outputs=[loras], api_name="lora_choices")
            blocks.load(self.characters, outputs=[character_table, character, sheet_character], api_name="characters")
        return blocks

    # -- handlers --

    async def generate(
        self,
        prompt: str,
        negative: str,
        style: str | list[str] | None,
        num_images: float,
        size: str,
        width: float,
        height: float,
        steps: float,
        guidance: float,
        scheduler: str,
        random_seed: bool,
        seed: float | None,
        output_format: str,
        base_model: str,
        pose: str,
        loras: list[str] | None,
        lora_weight: float,
        upscale: str,
        remove_background: bool,
        trim_box: bool,
        pixel_palette: str,
        pixel_factor: float,
        outline: bool,
        sprite_sheet: bool,
        clip_skip: float,
        vae: str,
        hires_scale: float,
        hires_upscaler: str,
        hires_steps: float,
        hires_denoise: float,
        tiling: str,
        variations: str,
        grid_x_field: str,
        grid_x_values: str,
        grid_y_field: str,
        grid_y_values: str,
        batch: bool,
        character: str | None,
        init_image: Any,
        strength: float,
        inpaint_area: str,
        reference_1: Image.Image | None,
        reference_1_strength: float,
        reference_1_mode: str,
        reference_2: Image.Image | None,
        reference_2_strength: float,
        reference_2_mode: str,
        request: gr.Request,
    ) -> AsyncIterator[tuple[str, Any, Any]]:
        slots = [
            (reference_1, reference_1_strength, reference_1_mode),
            (reference_2, reference_2_strength, reference_2_mode),
        ]
        lines = [line.strip() for line in prompt.splitlines() if line.strip()] if batch else [prompt]
        width_px: int | None
        height_px: int | None
        width_px, height_px = self._size(size, int(width), int(height))
        edit = _edit_fields(init_image, strength, inpaint_area)
        if edit and size != "custom":
            width_px = height_px = None  # the sizes follow the image
        # Everything but the prompt is the same for each line: images are encoded once.
        common: dict[str, Any] = {
            "negative_prompt": negative or "",
            "num_images": int(num_images),
            "width": width_px,
            "height": height_px,
            "steps": int(steps),
            "guidance_scale": float(guidance),
            "scheduler": scheduler,
            "output_format": output_format,
        }
        if style:
            common["style"] = style
        if base_model:
            common["model"] = base_model
        if pose and pose != NO_POSE:
            common["control"] = {"type": "openpose", "pose": pose}
        if loras:
            common["loras"] = [{"name": name, "weight": float(lora_weight)} for name in loras]
        steps_wanted = _postprocess_fields(
            upscale, remove_background, trim_box, pixel_palette, int(pixel_factor), outline, sprite_sheet
        )
        if steps_wanted:
            common["postprocess"] = steps_wanted
        common |= _model_fields(clip_skip, vae, hires_scale, hires_upscaler, hires_steps, hires_denoise)
        if tiling and tiling != "none":
            common["tiling"] = tiling
        if variations:
            common["variations"] = variations
        common |= _grid_fields(grid_x_field, grid_x_values, grid_y_field, grid_y_values)
        if not random_seed and seed is not None:
            common["seed"] = int(seed)
        if character and character != NO_CHARACTER:
            common["character"] = character
        common |= edit
        if references := _reference_fields(slots):
            common["references"] = references
        records: list[TaskRecord] = []
        try:
            for line in lines or [""]:
                record, _ = await self._ingress.submit(
                    convert({**common, "prompt": line}, GenerationRequest), principal=self._principal(request)
                )
                records.append(record)
        except ForgeError as exc:
            raise _ui_error(exc) from None
        self._session_tasks[request.session_hash or ""] = [record.id for record in records]
        async for update in self._follow(records):
            yield update

    async def _follow(self, records: list[TaskRecord]) -> AsyncIterator[tuple[str, Any, Any]]:
        """(status, preview, gallery) as the tasks progress, one after another, until all have ended."""
        yield f"Queued {len(records)} task(s)…", None, None
        finished: list[TaskRecord] = []
        for number, record in enumerate(records, start=1):
            label = f"Task {number}/{len(records)}" if len(records) > 1 else "Task"
            async with self._hub.subscribe(record.id) as events:
                current = await self._ingress.get(record.id, owner=record.owner)
                if not current.state.is_terminal:
                    async for event in events:
                        if isinstance(event, Progress):
                            image = self._preview(event.preview_jpeg_b64)
                            yield f"{label}: step {event.step}/{event.total}", image or gr.skip(), gr.skip()
                        elif isinstance(event, TERMINAL_EVENTS):
                            break
                        else:
                            yield f"{label}: {event.__class__.__name__.lower()}", gr.skip(), gr.skip()
            finished.append(await self._ingress.get(record.id, owner=record.owner))
            yield self._summary(finished), gr.skip(), self._gallery(finished)
        yield self._summary(finished), None, self._gallery(finished)

    async def create_character(
        self, name: str, description: str, references: list[Any] | None, request: gr.Request
    ) -> tuple[str, Any, Any, Any]:
        images = [png_base64(image) for image in _gallery_images(references)]
        try:
            create = convert(
                {"name": name.strip(), "description": description.strip(), "references": images}, CharacterCreate
            )
            saved = await self._ingress.characters.create(self._principal(request).owner, create)
        except ForgeError as exc:
            raise _ui_error(exc) from None
        table, choices, sheet_choices = await self.characters(request)
        message = f"Saved **{saved.name}** with {len(saved.references)} reference image(s)."
        return message, table, choices, sheet_choices

    async def characters(self, request: gr.Request) -> tuple[list[list[Any]], Any, Any]:
        """The caller's characters: the table, and the choices of the Create tab and the sheet picker."""
        found = await self._ingress.characters.list(owner=self._owner(request))
        table = [[c.name, c.version, c.description, len(c.references)] for c in found]
        names = [c.name for c in found]
        return table, gr.Dropdown(choices=[NO_CHARACTER, *names]), gr.Dropdown(choices=names)

    async def character_sheet(self, name: str | None, kind: str, steps: float, request: gr.Request) -> Any:
        if not name:
            raise gr.Error("Pick a character first.", print_exception=False)
        try:
            principal = self._principal(request)
            found = await self._ingress.characters.get(name, owner=principal.owner, field="character")
            sheet = convert({"kind": kind, "steps": int(steps)}, CharacterSheetRequest)
            record, _ = await self._ingress.submit(sheet_generation(found.id, sheet), principal=principal)
        except ForgeError as exc:
            raise gr.Error(exc.message, print_exception=False) from None
        self._session_tasks[request.session_hash or ""] = [record.id]
        async for status, _, gallery in self._follow([record]):
            yield status, gallery

    async def character_names(self, request: gr.Request) -> Any:
        found = await self._ingress.characters.list(owner=self._owner(request))
        return gr.Dropdown(choices=[c.name for c in found])

    async def animate(
        self, name: str | None, action: str, directions: float, frames: float, steps: float, request: gr.Request
    ) -> AsyncIterator[tuple[str, Any]]:
        """Queue the animation, then show its progress and, once done, one playing animation per direction."""
        if not name:
            raise gr.Error("Pick a character first.", print_exception=False)
        fields = {"action": action, "directions": int(directions), "frames": int(frames), "steps": int(steps)}
        try:
            principal = self._principal(request)
            found = await self._ingress.characters.get(name, owner=principal.owner, field="character")
            body = convert(fields, CharacterAnimationRequest)
            record, _ = await self._ingress.submit(animation_generation(found.id, body), principal=principal)
        except ForgeError as exc:
            raise _ui_error(exc) from None
        self._session_tasks[request.session_hash or ""] = [record.id]
        status = ""
        async for status, _, _ in self._follow([record]):
            yield status, None
        done = await self._ingress.get(record.id, owner=principal.owner)
        if done.state is TaskState.SUCCEEDED and done.spec.animation is not None and done.metadata_path:
            yield status, await anyio.to_thread.run_sync(self._animations, done)

    def _animations(self, record: TaskRecord) -> list[tuple[str, str]]:
        """Each direction's animated file, as a path the gallery can serve (it plays in the page)."""
        assert record.spec.animation is not None and record.metadata_path is not None
        animation = record.spec.animation
        folder = record.metadata_path.rsplit("/", 1)[0]
        shown = []
        for direction in DIRECTIONS[animation.directions]:
            name = f"{folder}/{ANIMATION_PREFIX}{direction}.{animation.format}"
            if self._outputs is not None:
                shown.append((str(self._outputs / name), direction.upper()))
                continue
            data = self._results.read(name)
            if data is not None:  # kept in Redis or behind auth: a copy in the temp folder Gradio may serve
                copy = Path(tempfile.gettempdir()) / f"chara-forge-{record.id}-{direction}.{animation.format}"
                copy.write_bytes(data)
                shown.append((str(copy), direction.upper()))
        return shown

    async def add_reference(self, task_id: str, references: list[Any] | None, request: gr.Request) -> list[Any]:
        """The selected generation's first image, added to the Characters tab's reference images."""
        record = await self._picked(task_id, request)
        data = await anyio.to_thread.run_sync(self._results.read, record.images[0]) if record.images else None
        if data is None:
            raise gr.Error("That generation has no image.", print_exception=False)
        with Image.open(io.BytesIO(data)) as image:
            added = image.convert("RGB")
        return [*_gallery_images(references), added][:MAX_CHARACTER_REFERENCES]

    async def cancel(self, request: gr.Request) -> str:
        """Cancels the tasks this browser session started last, and nobody else's."""
        states = []
        for task_id in self._session_tasks.pop(request.session_hash or "", []):
            try:
                states.append((await self._ingress.cancel(task_id, owner=self._owner(request))).state)
            except ForgeError:
                continue  # already finished: nothing to cancel
        if not states:
            return "Nothing to cancel."
        return f"Cancelled {sum(state is TaskState.CANCELLED for state in states)} task(s)."

    def _lora_names(self) -> list[str]:
        return [lora.name for lora in self._ingress.resources.loras.installed()]

    def lora_choices(self) -> Any:
        return gr.Dropdown(choices=self._lora_names())

    async def history(self, request: gr.Request) -> tuple[list[tuple[str, str]], list[str]]:
        owner = self._owner(request)
        found = await self._ingress.list(owner=owner, state=TaskState.SUCCEEDED, limit=HISTORY_LIMIT)
        records = [r for r in found if r.images]
        return [(self._shown(r.images[0]), r.spec.prompt[:60]) for r in records], [r.id for r in records]

    async def select(
        self, history_ids: list[str], event: gr.SelectData, request: gr.Request
    ) -> tuple[dict[str, Any], str]:
        if not 0 <= event.index < len(history_ids):
            return {}, ""
        record = await self._picked(history_ids[event.index], request)
        view: dict[str, Any] = {
            "id": record.id,
            "seeds": record.spec.seeds,
            "model": record.spec.model,
            "request": {f: getattr(record.spec, f) for f in record.spec.__struct_fields__},
        }
        return view, record.id

    async def reuse(self, task_id: str, request: gr.Request) -> list[Any]:
        spec = (await self._picked(task_id, request)).spec
        return [
            spec.prompt,
            spec.negative_prompt,
            spec.styles,
            spec.num_images,
            "custom",
            spec.width,
            spec.height,
            spec.steps,
            spec.guidance_scale,
            spec.scheduler,
            False,
            spec.seed,
            spec.output_format,
            spec.model,
            next((c.pose for c in spec.control if c.pose), NO_POSE),
            [lora.name for lora in spec.loras],
            spec.loras[0].weight if spec.loras else 0.8,
            *_postprocess_settings(spec.postprocess),
            spec.clip_skip or 0,
            spec.vae or OWN_VAE_LABEL,  # the VAE it ran with (None: the model's own)
            *_hires_settings(spec.hires),
            spec.tiling,
            spec.variations,
            *_grid_settings(spec.grid),
        ]

    async def same_seed(self, task_id: str, request: gr.Request) -> tuple[str, bool, int]:
        return "", False, (await self._picked(task_id, request)).spec.seed

    async def _picked(self, task_id: str, request: gr.Request) -> TaskRecord:
        if not task_id:
            raise gr.Error("Pick a generation in the history first.", print_exception=False)
        try:
            return await self._ingress.get(task_id, owner=self._owner(request))
        except ForgeError as exc:
            raise gr.Error(exc.message, print_exception=False) from None

    # -- helpers --

    def _size(self, preset: str, width: int, height: int) -> tuple[int, int]:
        return preset_size(self._ingress.model, preset) or (width, height)

    def _gallery(self, records: list[TaskRecord]) -> list[tuple[Any, str]]:
        shown = [
            (self._shown(path), caption)
            for r in records
            for path, caption in zip(r.images, _captions(r.spec), strict=False)  # images: none until it succeeds
        ]
        for record in records:  # a prompt matrix's labelled grid after its cells
            if record.spec.grid is not None and record.metadata_path and record.state is TaskState.SUCCEEDED:
                shown.append((self._shown(f"{record.metadata_path.rsplit('/', 1)[0]}/{GRID_IMAGE}"), "grid"))
        return shown

    def _shown(self, path: str) -> Any:
        """An output as the gallery gets it: its path, or (with auth on, or from Redis) the image itself."""
        if self._outputs is not None:
            return str(self._outputs / path)
        data = self._results.read(path)
        if data is None:
            return None
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.copy()

    @staticmethod
    def _summary(records: list[TaskRecord]) -> str:
        parts = []
        for record in records:
            if record.state is TaskState.SUCCEEDED:
                parts.append(f"Done: {len(record.images)} image(s), seeds {', '.join(map(str, record.spec.seeds))}")
            elif record.state is TaskState.CANCELLED:
                parts.append("Cancelled")
            else:
                parts.append(f"Failed ({record.error_code or record.state}): {record.error_message or ''}")
        return "  \n".join(parts)

    @staticmethod
    def _preview(preview_b64: str | None) -> Image.Image | None:
        if preview_b64 is None:
            return None
        return Image.open(io.BytesIO(base64.b64decode(preview_b64)))


def _captions(spec: GenerationSpec) -> list[str]:
    """Each image's seed, and its prompt where the task's images differ (variations, a grid)."""
    if not spec.variants:
        return [f"seed {seed}" for seed in spec.seeds]
    return [f"seed {seed}: {spec.prompt_of(index)}" for index, seed in enumerate(spec.seeds)]
