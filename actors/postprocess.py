"""The post-processor: encodes raw images with their parameters, writes them, and marks the task done."""

from __future__ import annotations

import logging
import shutil
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, assert_never

import anyio
import anyio.to_thread
import msgspec
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream

from actors.encoding import EXTENSIONS, encode_image, write_atomically
from actors.hub import EventHub
from actors.lifecycle import fail_task
from actors.store import Store
from forge import __version__
from forge.engine import ModelInfo
from forge.events import Postprocessing, Succeeded
from forge.infotext import infotext
from forge.messages import Generated, PostprocessInbox
from forge.requests import GenerationSpec
from forge.tasks import TaskState

if TYPE_CHECKING:
    from PIL.Image import Image

log = logging.getLogger(__name__)


class ImageMetadata(msgspec.Struct, frozen=True):
    file: str
    seed: int
    width: int
    height: int
    parameters: str


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
    finished_at: float
    version: str = __version__


def write_outputs(
    outputs: Path,
    *,
    task_id: str,
    spec: GenerationSpec,
    images: list[Image],
    model: ModelInfo,
    device: str,
    attempt: int,
    denoise_s: float,
    created_at: float,
) -> tuple[list[str], str]:
    """Encode and write every image and metadata.json; returns paths relative to `outputs`."""
    entries = []
    for index, (image, seed) in enumerate(zip(images, spec.seeds, strict=True)):
        parameters = infotext(spec, seed, model.name)
        name = f"{task_id}/{index}.{EXTENSIONS[spec.output_format]}"
        write_atomically(outputs / name, encode_image(image, spec.output_format, parameters))
        entries.append(
            ImageMetadata(file=name, seed=seed, width=image.width, height=image.height, parameters=parameters)
        )
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
    )
    metadata_name = f"{task_id}/metadata.json"
    write_atomically(outputs / metadata_name, msgspec.json.format(msgspec.json.encode(metadata)))
    return [entry.file for entry in entries], metadata_name


class Postprocessor:
    def __init__(
        self,
        *,
        store: Store,
        hub: EventHub,
        inbox: MemoryObjectReceiveStream[PostprocessInbox],
        outputs: Path,
    ) -> None:
        self._store = store
        self._hub = hub
        self._inbox = inbox
        self._outputs = outputs
        self._busy = False
        self._finished_one = anyio.Event()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        self._outputs.mkdir(parents=True, exist_ok=True)
        task_status.started()
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

    async def wait_idle(self) -> None:
        while self._busy or self._inbox.statistics().current_buffer_used:
            self._finished_one = anyio.Event()
            await self._finished_one.wait()

    async def _finish(self, msg: Generated) -> None:
        task = msg.task
        if not await self._store.transition(
            task.id, attempt=task.attempt, from_states=[TaskState.RUNNING], to=TaskState.POSTPROCESSING
        ):
            return  # cancelled, or superseded by a newer attempt
        self._hub.publish(Postprocessing(task_id=task.id))
        try:
            images, metadata = await anyio.to_thread.run_sync(
                partial(
                    write_outputs,
                    self._outputs,
                    task_id=task.id,
                    spec=task.spec,
                    images=msg.images,
                    model=msg.model,
                    device=msg.device,
                    attempt=task.attempt,
                    denoise_s=msg.denoise_s,
                    created_at=task.created_at,
                )
            )
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
        if await self._store.transition(
            task.id,
            attempt=task.attempt,
            from_states=[TaskState.POSTPROCESSING],
            to=TaskState.SUCCEEDED,
            images=images,
            metadata_path=metadata,
        ):
            self._hub.publish(Succeeded(task_id=task.id, images=images))
        else:  # cancelled while its files were being written
            await anyio.to_thread.run_sync(shutil.rmtree, self._outputs / task.id, True)
