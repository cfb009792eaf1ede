"""One engine actor per device: loads and warms a backend, then runs dispatched tasks in a worker thread."""

from __future__ import annotations

import base64
import io
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, assert_never

import anyio
from anyio.abc import TaskStatus
from anyio.from_thread import BlockingPortal
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from actors.device_thread import DeviceThread
from actors.hub import EventHub
from actors.latest_value import LatestValue
from actors.lifecycle import cancel_task, fail_task
from actors.store import Store
from engines.loader import load_engine
from forge.engine import Engine, Job, JobCancelled, ModelInfo, OutOfMemory, job_for
from forge.events import AnyTaskEvent, Progress
from forge.messages import Dispatch, EngineIdle, EngineInbox, EngineReady, Generated, PostprocessInbox, SchedulerInbox
from forge.tasks import TaskRecord, TaskState

if TYPE_CHECKING:
    from PIL.Image import Image

log = logging.getLogger(__name__)

SHUTDOWN = "shutdown"
PROGRESS_FLUSH_S = 1.0


@dataclass(frozen=True)
class PreviewSettings:
    every: int
    size: int


def _jpeg_b64(image: Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=70)
    return base64.b64encode(buffer.getvalue()).decode()


class EngineActor:
    def __init__(
        self,
        *,
        device: str,
        backend: str,
        model: ModelInfo,
        cpu_threads: int,
        previews: PreviewSettings,
        store: Store,
        hub: EventHub,
        inbox: MemoryObjectReceiveStream[EngineInbox],
        scheduler: MemoryObjectSendStream[SchedulerInbox],
        postprocess: MemoryObjectSendStream[PostprocessInbox],
    ) -> None:
        self.device = device
        self.ready = False
        self._backend = backend
        self._cpu_threads = cpu_threads
        self._model = model
        self._previews = previews
        self._store = store
        self._hub = hub
        self._inbox = inbox
        self._scheduler = scheduler
        self._postprocess = postprocess
        # Every blocking call for this device runs on this one thread, in order (pipelines are not thread-safe).
        self._thread = DeviceThread(f"engine-{device}")

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        log.info("engine %s: loading %s (%s backend)", self.device, self._model.name, self._backend)
        try:
            engine = await self._thread.run_sync(
                load_engine, self._backend, self._model, self.device, self._cpu_threads
            )
        except BaseException:
            self._thread.stop()
            raise
        try:
            await self._thread.run_sync(engine.warm)
            self.ready = True
            log.info("engine %s: ready", self.device)
            task_status.started()
            await self._scheduler.send(EngineReady(device=self.device))
            async with self._inbox, BlockingPortal() as portal:
                progress = LatestValue(portal, self._hub.publish)
                async for msg in self._inbox:
                    match msg:
                        case Dispatch():
                            await self._execute(engine, msg, progress)
                        case _:
                            assert_never(msg)
        finally:
            self.ready = False
            with anyio.CancelScope(shield=True):
                await self._thread.run_sync(engine.close)
            self._thread.stop()

    async def _execute(self, engine: Engine, msg: Dispatch, progress: LatestValue[AnyTaskEvent]) -> None:
        task = msg.task
        try:
            try:
                result = await self._thread.run_sync(
                    engine.run, self._job(task, msg, progress), on_cancel=lambda: msg.cancel.set(SHUTDOWN)
                )
            finally:  # the last step's progress goes out before the task's final event, never after it
                with anyio.move_on_after(PROGRESS_FLUSH_S, shield=True):
                    await progress.wait_delivered()
        except anyio.get_cancelled_exc_class():  # a forced stop: the task waits for the next start
            with anyio.CancelScope(shield=True):
                await self._requeue(task)
            raise
        except JobCancelled:
            if msg.cancel.reason == SHUTDOWN:
                await self._requeue(task)
            else:
                await cancel_task(self._store, self._hub, task, [TaskState.RUNNING])
        except OutOfMemory as exc:
            await fail_task(
                self._store,
                self._hub,
                task,
                [TaskState.RUNNING],
                "out_of_memory",
                f"{self.device} ran out of memory; try a smaller size or fewer images ({exc})",
            )
        except Exception as exc:
            log.exception("engine %s: task %s failed", self.device, task.id)
            await fail_task(
                self._store, self._hub, task, [TaskState.RUNNING], "engine_error", f"{type(exc).__name__}: {exc}"
            )
        else:
            await self._postprocess.send(
                Generated(task=task, images=result.images, device=self.device, denoise_s=result.denoise_s)
            )
        finally:
            self._hub.forget_progress(task.id)
            await self._scheduler.send(EngineIdle(device=self.device, task_id=task.id))

    async def _requeue(self, task: TaskRecord) -> None:
        """Stopped by a shutdown, not by its own fault: it waits, same attempt, for the next start."""
        await self._store.transition(
            task.id, attempt=task.attempt, from_states=[TaskState.RUNNING], to=TaskState.QUEUED
        )

    def _job(self, task: TaskRecord, msg: Dispatch, progress: LatestValue[AnyTaskEvent]) -> Job:
        spec = task.spec

        def on_progress(step: int, total: int, preview: Image | None) -> None:
            event = Progress(
                task_id=task.id,
                step=step,
                total=total,
                preview_jpeg_b64=_jpeg_b64(preview) if preview is not None else None,
            )
            progress.put(event)

        return job_for(
            spec,
            preview_every=self._previews.every,
            preview_size=self._previews.size,
            on_progress=on_progress,
            cancel=msg.cancel,
        )
