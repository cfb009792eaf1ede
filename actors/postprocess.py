"""The post-processor: encodes raw images with their parameters, writes them, and marks the task done."""

from __future__ import annotations

import io
import json
import logging
import time
from functools import partial
from pathlib import Path
from typing import Any, assert_never

import anyio
import anyio.from_thread
import anyio.to_thread
import msgspec
import structlog
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream
from PIL.Image import Image

from actors.device_thread import DeviceThread
from actors.encoding import EXTENSIONS, encode_image
from actors.files import Files
from actors.hub import Events
from actors.lifecycle import fail_task
from actors.store import TaskStore
from engines.animation_files import SHEET_IMAGE, animated, aseprite_json, godot_sprite_frames
from engines.animation_poses import DIRECTIONS
from engines.image_grid import labelled_grid, tile_preview
from engines.image_ops import hex_rgb, shared_palette
from engines.postprocess import PostprocessTools, planned_steps
from engines.sprite_sheet import pack
from forge import __version__
from forge.animation import directions
from forge.content_filter import CONTENT_FILTERED
from forge.engine import AssetError, CancelFlag, JobCancelled, ModelInfo
from forge.events import AnyTaskEvent, Cancelled, Postprocessing, Succeeded
from forge.infotext import infotext
from forge.messages import Generated, PostprocessInbox
from forge.model_files import ModelFiles
from forge.requests import AnimationRequest, GenerationSpec, PostprocessRequest
from forge.tasks import TaskState

log = logging.getLogger(__name__)


class ImageMetadata(msgspec.Struct, frozen=True):
    file: str
    seed: int
    width: int
    height: int
    parameters: str
    postprocess: list[str] = []
    prompt: str = ""  # the prompt as the image got it (its variations chosen, a grid cell's replacement made)


class SpriteSheetFiles(msgspec.Struct, frozen=True):
    image: str
    atlas: str


class AnimationFiles(msgspec.Struct, frozen=True):
    directions: dict[str, str]  # direction -> its GIF or WebP
    aseprite: str
    godot: str


SPRITE_SHEET_IMAGE = SHEET_IMAGE
SPRITE_SHEET_ATLAS = "sprite-sheet.json"
ANIMATION_PREFIX = "animation-"
ASEPRITE_ATLAS = "animation.aseprite.json"
GODOT_SPRITE_FRAMES = "animation.tres"
GRID_IMAGE = "grid.png"
TILE_PREVIEW = "tile-preview-{index}.png"


class ResultMetadata(msgspec.Struct, frozen=True, kw_only=True):
    """`metadata.json` beside a task's images: enough to reproduce every image."""

    id: str
    model: str
    model_is_tiny: bool
    request: GenerationSpec
    images: list[ImageMetadata]
    device: str
    attempt: int
    denoise_s: float
    created_at: float
    sprite_sheet: SpriteSheetFiles | None = None
    animation: AnimationFiles | None = None
    grid: str | None = None  # a prompt matrix's labelled grid image
    tile_previews: list[str] = []  # each seamless tile repeated, when asked for
    finished_at: float
    version: str = __version__


def attempt_folder(task_id: str, attempt: int) -> str:
    """Where an attempt's files go: a retry writes beside the first, never over a result that may still win."""
    return task_id if attempt <= 1 else f"{task_id}/attempt-{attempt}"


def write_outputs(
    files: Files,
    *,
    task_id: str,
    spec: GenerationSpec,
    images: list[Image],
    model: ModelInfo,
    device: str,
    attempt: int,
    denoise_s: float,
    created_at: float,
    applied: list[list[str]] | None = None,
) -> tuple[list[str], str]:
    """Encode and write every image, the sprite sheet if asked for, and metadata.json; returns their names
    (the images', then metadata.json's; the sprite sheet lies beside metadata.json)."""
    folder = attempt_folder(task_id, attempt)
    options = spec.postprocess or PostprocessRequest()
    entries = []
    for index, (image, seed) in enumerate(zip(images, spec.seeds, strict=True)):
        steps = applied[index] if applied else []
        parameters = infotext(spec, seed, model.name, postprocess=steps, index=index)
        name = f"{folder}/{index}.{EXTENSIONS[spec.output_format]}"
        encoded = encode_image(
            image,
            spec.output_format,
            parameters,
            quality=options.quality,
            lossless=options.lossless,
            matte=hex_rgb(options.matte),
        )
        files.write(name, encoded)
        entries.append(
            ImageMetadata(
                file=name,
                seed=seed,
                width=image.width,
                height=image.height,
                parameters=parameters,
                postprocess=steps,
                prompt=spec.prompt_of(index),
            )
        )
    grid = write_grid(files, folder, spec, images) if spec.grid is not None else None
    previews = []
    if spec.tile_preview:
        for index, image in enumerate(images):
            previews.append(f"{folder}/{TILE_PREVIEW.format(index=index)}")
            files.write(previews[-1], _png(tile_preview(image, spec.tiling)))
    sheet = animation = None
    if options.sprite_sheet is not None:
        # A sheet's frames are named by its views (front, back, happy, ...), others by their index.
        labels = [view.label for view in spec.views] or [str(index) for index in range(len(images))]
        frames = [(f"{task_id}/{label}", image) for label, image in zip(labels, images, strict=True)]
        atlas, document = pack(frames, SPRITE_SHEET_IMAGE, options.sprite_sheet.columns, options.sprite_sheet.padding)
        sheet = SpriteSheetFiles(image=f"{folder}/{SPRITE_SHEET_IMAGE}", atlas=f"{folder}/{SPRITE_SHEET_ATLAS}")
        files.write(sheet.image, _png(atlas))
        files.write(sheet.atlas, json.dumps(document, indent=1).encode())
        if spec.animation is not None:
            animation = write_animation(files, folder, spec.animation, images, document)
    metadata = ResultMetadata(
        id=task_id,
        model=model.name,
        model_is_tiny=model.is_tiny,
        request=spec,
        images=entries,
        device=device,
        attempt=attempt,
        denoise_s=round(denoise_s, 4),
        created_at=created_at,
        finished_at=time.time(),
        sprite_sheet=sheet,
        animation=animation,
        grid=grid,
        tile_previews=previews,
    )
    metadata_name = f"{folder}/metadata.json"
    files.write(metadata_name, msgspec.json.format(msgspec.json.encode(metadata)))
    return [entry.file for entry in entries], metadata_name


def write_animation(
    files: Files, folder: str, animation: AnimationRequest, images: list[Image], document: dict[str, Any]
) -> AnimationFiles:
    """An animation per direction and the sheet's two engine atlases, beside the sprite sheet."""
    rows, frames = directions(animation), animation.frame_count
    prefix = animation.action if isinstance(animation.action, str) else "cycle"
    written = {}
    for row, direction in enumerate(rows):
        name = f"{folder}/{ANIMATION_PREFIX}{direction}.{animation.format}"
        files.write(name, animated(images[row * frames : (row + 1) * frames], animation.frame_ms, animation.format))
        written[direction] = name
    aseprite = aseprite_json(document, rows, frames, animation.frame_ms, prefix)
    result = AnimationFiles(
        directions=written, aseprite=f"{folder}/{ASEPRITE_ATLAS}", godot=f"{folder}/{GODOT_SPRITE_FRAMES}"
    )
    files.write(result.aseprite, json.dumps(aseprite, indent=1).encode())
    files.write(result.godot, godot_sprite_frames(document, rows, frames, animation.frame_ms, prefix).encode())
    return result


def write_grid(files: Files, folder: str, spec: GenerationSpec, images: list[Image]) -> str:
    """A prompt matrix's images in one picture, each column and row labelled with its value."""
    assert spec.grid is not None
    x, y = spec.grid.x, spec.grid.y
    columns = [f"{x.field}: {value}" for value in x.values]
    rows = [f"{y.field}: {value}" for value in y.values] if y is not None else []
    name = f"{folder}/{GRID_IMAGE}"
    files.write(name, _png(labelled_grid(images, spec.grid.columns, columns, rows)))
    return name


def _png(image: Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def written_files(images: list[str], metadata: str) -> list[str]:
    """Every file `write_outputs` may have written for these names."""
    folder = metadata.rsplit("/", 1)[0]
    animations = [f"{folder}/{ANIMATION_PREFIX}{d}.{ext}" for d in DIRECTIONS[8] for ext in ("gif", "webp")]
    extras = [SPRITE_SHEET_IMAGE, SPRITE_SHEET_ATLAS, ASEPRITE_ATLAS, GODOT_SPRITE_FRAMES, GRID_IMAGE]
    extras += [TILE_PREVIEW.format(index=index) for index in range(len(images))]
    return [*images, metadata, *(f"{folder}/{name}" for name in extras), *animations]


class Postprocessor:
    def __init__(
        self,
        *,
        store: TaskStore,
        hub: Events,
        inbox: MemoryObjectReceiveStream[PostprocessInbox],
        results: Files,
        tools: PostprocessTools,
        upscalers: ModelFiles,
        background_models: ModelFiles,
    ) -> None:
        self._store = store
        self._hub = hub
        self._inbox = inbox
        self._results = results
        self._tools = tools
        self._upscalers = upscalers
        self._background_models = background_models
        # Upscaling runs torch: one long-lived thread, like an engine's, keeps to one CPU thread team.
        self._thread = DeviceThread("postprocess")
        self._busy = False
        self._finished_one = anyio.Event()
        self._cancel: tuple[str, CancelFlag] | None = None
        hub.add_tap(self._on_event)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            await self._serve()
        finally:
            self._thread.stop()

    async def _serve(self) -> None:
        async with self._inbox:
            async for msg in self._inbox:
                match msg:
                    case Generated():
                        self._busy = True
                        try:
                            await self._finish(msg)
                        finally:
                            self._busy = False
                            self._finished_one.set()
                    case _:
                        assert_never(msg)

    def _process(
        self, task_id: str, images: list[Image], options: PostprocessRequest, cancel: CancelFlag, frames: bool
    ) -> tuple[list[Image], list[list[str]]]:
        """On the post-processing thread: every step on every image, announcing each as it starts, and
        stopping within the step it is in once the task is cancelled. `frames`: the images are an animation's,
        so pixel art without a named palette maps every frame to one palette chosen from all of them."""
        upscaler = self._model_file(self._upscalers, "upscaler", options.upscaler) if options.upscale else None
        background = None
        if options.remove_background:
            background = self._model_file(self._background_models, "background model", options.background_model)
        total = len(planned_steps(options))
        steps = [0] * len(images)

        def announce(index: int, stage: str) -> None:
            cancel.raise_if_set()
            steps[index] += 1
            event = Postprocessing(task_id=task_id, stage=stage, image=index, step=steps[index], total=total)
            anyio.from_thread.run_sync(self._hub.publish, event, token=self._thread.token)

        art = options.pixel_art
        if not (frames and art is not None and art.palette is None and len(images) > 1):
            done = [
                self._tools.apply(image, options, upscaler, background, partial(announce, index), cancel)
                for index, image in enumerate(images)
            ]
            return [image for image, _ in done], [lines for _, lines in done]
        # Everything before the pixel art on every frame, then one palette from all of them, then the rest.
        before = msgspec.structs.replace(options, pixel_art=None, resize=None)
        after = PostprocessRequest(pixel_art=art, resize=options.resize, matte=options.matte)
        first = [
            self._tools.apply(image, before, upscaler, background, partial(announce, index), cancel)
            for index, image in enumerate(images)
        ]
        palette = shared_palette([image for image, _ in first], art.factor, art.colors)
        second = [
            self._tools.apply(image, after, None, None, partial(announce, index), cancel, palette)
            for index, (image, _) in enumerate(first)
        ]
        return [image for image, _ in second], [a + b for (_, a), (_, b) in zip(first, second, strict=True)]

    def _watch_cancel(self, task_id: str) -> CancelFlag:
        """A flag the `cancelled` event of this task sets while its steps run."""
        self._cancel = (task_id, CancelFlag())
        return self._cancel[1]

    def _on_event(self, event: AnyTaskEvent) -> None:
        if isinstance(event, Cancelled) and self._cancel is not None and self._cancel[0] == event.task_id:
            self._cancel[1].set("cancelled")

    @staticmethod
    def _model_file(files: ModelFiles, what: str, name: str | None) -> Path:
        path = files.path(name or "")
        if path is None:
            raise AssetError("postprocess_model_missing", files.missing_message(what, name or ""))
        return path

    async def wait_idle(self) -> None:
        while self._busy or self._inbox.statistics().current_buffer_used:
            self._finished_one = anyio.Event()
            await self._finished_one.wait()

    async def _finish(self, msg: Generated) -> None:
        with structlog.contextvars.bound_contextvars(task_id=msg.task.id, request_id=msg.request_id):
            await self._finish_bound(msg)
            log.info("finished post-processing in %.2f s of denoise", msg.denoise_s)

    async def _finish_bound(self, msg: Generated) -> None:
        task = msg.task
        entered = Postprocessing(task_id=task.id)
        if not await self._store.transition(
            task.id, attempt=task.attempt, from_states=[TaskState.RUNNING], to=TaskState.POSTPROCESSING, event=entered
        ):
            return  # cancelled, or superseded by a newer attempt
        self._hub.recorded(entered)
        try:
            unsafe = await self._thread.run_sync(self._tools.screen, msg.images)
            if unsafe is not None:
                await fail_task(
                    self._store,
                    self._hub,
                    task,
                    [TaskState.POSTPROCESSING],
                    CONTENT_FILTERED,
                    unsafe,
                    to=TaskState.FILTERED,
                )
                return
            processed, applied = msg.images, None
            options = task.spec.postprocess
            if options is not None and planned_steps(options):
                processed, applied = await self._thread.run_sync(
                    self._process,
                    task.id,
                    msg.images,
                    options,
                    self._watch_cancel(task.id),
                    task.spec.animation is not None,
                )
            write = partial(
                write_outputs,
                self._results,
                task_id=task.id,
                spec=task.spec,
                images=processed,
                model=msg.model,
                device=msg.device,
                attempt=task.attempt,
                denoise_s=msg.denoise_s,
                created_at=task.created_at,
                applied=applied,
            )
            # Made images are accepted work too: on a full disk they wait here, in memory, for space.
            images, metadata = await self._store.disk.write(
                f"the images of task {task.id}", lambda: self._thread.run_sync(write)
            )
        except JobCancelled:
            log.info("cancelled during post-processing")
            return
        except AssetError as exc:
            await fail_task(self._store, self._hub, task, [TaskState.POSTPROCESSING], exc.code, str(exc))
            return
        except Exception as exc:
            log.exception("post-processing task %s failed", task.id)
            await fail_task(
                self._store,
                self._hub,
                task,
                [TaskState.POSTPROCESSING],
                "postprocess_error",
                f"{type(exc).__name__}: {exc}",
            )
            return
        finally:
            self._cancel = None
        succeeded = Succeeded(task_id=task.id, images=images)
        if await self._store.transition(
            task.id,
            attempt=task.attempt,
            from_states=[TaskState.POSTPROCESSING],
            to=TaskState.SUCCEEDED,
            event=succeeded,
            images=images,
            metadata_path=metadata,
        ):
            self._hub.recorded(succeeded)
        else:  # cancelled, or taken over by a newer attempt, while its files were being written
            await anyio.to_thread.run_sync(self._results.remove, written_files(images, metadata))
