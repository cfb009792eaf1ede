"""One engine actor per device: loads and warms a backend, then runs dispatched tasks in a worker thread."""

from __future__ import annotations

import base64
import io
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, assert_never

import anyio
import structlog
from anyio.abc import TaskGroup, TaskStatus
from anyio.from_thread import BlockingPortal
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from actors.device_thread import DeviceThread
from actors.hub import Events
from actors.latest_value import LatestValue
from actors.lifecycle import cancel_task, fail_task
from actors.model_catalog import ModelCatalog
from actors.step_batch import StepBatch
from actors.store import TaskStore
from actors.uploads import UploadStore
from engines.cache import ModelCache
from engines.loader import BackendSettings, load_engine, prepare_thread
from forge.engine import (
    AssetError,
    CancelFlag,
    ControlJob,
    Engine,
    GenerationResult,
    Hires,
    ImageEdit,
    Job,
    JobCancelled,
    LoraWeight,
    ModelInfo,
    ModelLoadError,
    OutOfMemory,
    Reference,
    References,
    Vae,
    job_for,
    views_batch_key,
)
from forge.events import AnyTaskEvent, Progress
from forge.loras import LoraCatalog
from forge.messages import (
    Assignment,
    Dispatch,
    EngineIdle,
    EngineInbox,
    EngineReady,
    Generated,
    PostprocessInbox,
    SchedulerInbox,
    TaskLeft,
)
from forge.model_files import ModelFiles
from forge.requests import GenerationSpec
from forge.resolve import HIRES_UPSCALERS
from forge.tasks import TaskRecord, TaskState

if TYPE_CHECKING:
    from PIL.Image import Image

log = logging.getLogger(__name__)

SHUTDOWN = "shutdown"
CLAIM_LOST = "claim lost"  # the fleet's reaper gave the task to a newer attempt: this run's result is void
PROGRESS_FLUSH_S = 1.0


@dataclass(frozen=True)
class _Run:
    """A task of the batch being run, with its engine job."""

    assignment: Assignment
    model: ModelInfo
    job: Job
    progress: LatestValue[AnyTaskEvent]


@dataclass(frozen=True)
class PreviewSettings:
    every: int
    size: int


def _pose_control(pose: str) -> ControlJob:
    return ControlJob(type="openpose", image=None, pose=pose, preprocess=False, strength=0.8, start=0, end=1)


def image_jobs(spec: GenerationSpec, whole: Job, hires_of: Callable[[GenerationSpec], Hires | None]) -> list[Job]:
    """One job per image of a task whose images differ: a sheet's views (each its words and pose, the sheet's
    seed), chosen prompt variations, a grid's cells (each its own settings). Progress is the whole task's."""
    images = [spec.image_spec(index) for index in range(len(spec.seeds))]
    done, totals = [0] * len(images), [image.steps for image in images]
    jobs = []
    for index, image in enumerate(images):
        controls = whole.controls
        if spec.views:  # a view's pose is its only control
            pose = spec.views[index].pose
            controls = [_pose_control(pose)] if pose else []

        def progress(step: int, total: int, preview: Image | None, index: int = index) -> None:
            done[index], totals[index] = step, total
            if whole.on_progress is not None:
                whole.on_progress(sum(done), sum(totals), preview)

        jobs.append(
            replace(
                whole,
                prompt=spec.prompt_for(index),
                negative_prompt=image.styled_negative_prompt,
                seeds=[spec.seeds[index]],
                steps=image.steps,
                guidance_scale=image.guidance_scale,
                scheduler=image.scheduler,
                clip_skip=image.clip_skip,
                hires=hires_of(image),
                controls=controls,
                on_progress=progress,
            )
        )
    return jobs


def run_images(engine: Engine, whole: Job) -> GenerationResult:
    """A task's image jobs, those that can share a batch as one (in order of their first image)."""
    groups: dict[tuple[object, ...], list[int]] = {}
    for index, job in enumerate(whole.views):
        key = views_batch_key(job)
        groups.setdefault((index,) if key is None else key, []).append(index)
    images: dict[int, Image] = {}
    denoise_s = 0.0
    for indices in groups.values():
        for part, result in _as_the_device_allows(engine, [whole.views[index] for index in indices]):
            images.update((indices[index], image) for index, image in zip(part, result.images, strict=True))
            denoise_s += result.denoise_s
    return GenerationResult(images=[images[index] for index in range(len(whole.views))], denoise_s=denoise_s)


def _as_the_device_allows(engine: Engine, jobs: list[Job]) -> Iterator[tuple[list[int], GenerationResult]]:
    """`jobs` (one image each) as one batch, or, where that runs out of memory, in halves, quarters and so on:
    (the jobs' indices, their images as one result) for each part run."""
    size, start = len(jobs), 0
    while start < len(jobs):
        part = list(range(start, min(start + size, len(jobs))))
        try:
            results = engine.run_batch([jobs[index] for index in part])
        except OutOfMemory:
            if size == 1:
                raise
            size = (size + 1) // 2
            continue
        yield part, GenerationResult(images=[result.images[0] for result in results], denoise_s=results[0].denoise_s)
        start += len(part)


def _jpeg_b64(image: Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=70)
    return base64.b64encode(buffer.getvalue()).decode()


class EngineActor:
    def __init__(
        self,
        *,
        device: str,
        backend: BackendSettings,
        catalog: ModelCatalog,
        loras: LoraCatalog,
        uploads: UploadStore,
        memory_budget: int,
        cpu_threads: int,
        previews: PreviewSettings,
        store: TaskStore,
        hub: Events,
        inbox: MemoryObjectReceiveStream[EngineInbox],
        scheduler: MemoryObjectSendStream[SchedulerInbox],
        postprocess: MemoryObjectSendStream[PostprocessInbox],
        on_model_loaded: Callable[[str, str, float], None] | None = None,
        max_images: int = 1,
        on_step: Callable[[int], None] | None = None,
    ) -> None:
        """`on_model_loaded(device, model id, seconds)` hears of each model loaded and warmed (on the device
        thread). `max_images`: the most images a step-level batch holds; `on_step` hears the images of each
        of its steps (on the device thread)."""
        self.device = device
        self.ready = False
        self._backend = backend
        self._cpu_threads = cpu_threads
        self._catalog = catalog
        self._loras = loras
        self._uploads = uploads
        self._cache = ModelCache(
            device,
            memory_budget,
            catalog.default.id,
            lambda model: load_engine(backend, model, device),
            None if on_model_loaded is None else partial(on_model_loaded, device),
        )
        self._previews = previews
        self._store = store
        self._hub = hub
        self._inbox = inbox
        self._scheduler = scheduler
        self._postprocess = postprocess
        # Every blocking call for this device runs on this one thread, in order (pipelines are not thread-safe).
        self._thread = DeviceThread(f"engine-{device}")
        self._max_images = max_images
        self._on_step = on_step
        self._steps: StepBatch | None = None  # the step-level batch running now

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        default = self._catalog.default
        log.info("engine %s: loading %s (%s backend)", self.device, default.id, self._backend.name)
        try:
            await self._thread.run_sync(prepare_thread, self.device, self._cpu_threads)
            await self.load_model(default)  # loads and warms; the default model failing is fatal
        except BaseException:
            self._thread.stop()
            raise
        try:
            self.ready = True
            log.info("engine %s: ready", self.device)
            task_status.started()
            await self._scheduler.send(EngineReady(device=self.device))
            async with self._inbox, BlockingPortal() as portal, anyio.create_task_group() as group:
                async for msg in self._inbox:
                    match msg:
                        case Dispatch(batch=batch, step_level=True):
                            await self._step_level(batch, portal, group)
                        case Dispatch(batch=batch):
                            await self._execute(batch, portal)
                        case _:
                            assert_never(msg)
        finally:
            self.ready = False
            with anyio.CancelScope(shield=True):
                await self._thread.run_sync(self._cache.close)
            self._thread.stop()

    async def load_model(self, model: ModelInfo) -> None:
        """Load and warm `model` on this device (after the job in progress), unloading others to fit."""
        self._catalog.loading(self.device, model.id)
        try:
            await self._thread.run_sync(self._cache.get, model)
        except ModelLoadError as exc:
            self._catalog.failed(self.device, model.id, str(exc))
            raise
        finally:
            self._catalog.loaded(self.device, self._cache.loaded())

    async def unload_model(self, model_id: str) -> bool:
        unloaded = await self._thread.run_sync(self._cache.unload, model_id)
        self._catalog.loaded(self.device, self._cache.loaded())
        return unloaded

    def _generate(self, model: ModelInfo, jobs: list[Job]) -> list[GenerationResult]:
        """On the device thread: the model (loaded if need be), then the batch."""
        engine, first = self._cache.get(model), jobs[0]
        results = [run_images(engine, first)] if first.views else engine.run_batch(jobs)
        self._remeasure_after(model, first)
        return results

    def _remeasure_after(self, model: ModelInfo, job: Job) -> None:
        """LoRAs, ControlNets, IP-Adapters and inpainting UNets stay loaded once a job used them: count them."""
        if job.loras or job.controls or job.references or job.image_edit or job.views:
            self._cache.remeasure(model.id)

    def _mark_used(self, model: ModelInfo) -> None:
        """The model is about to run: loading first if it is not loaded on this device."""
        if model.id not in self._cache.loaded():
            self._catalog.loading(self.device, model.id)
        self._catalog.used(model.id)

    async def _requeue_all(self, tasks: list[TaskRecord]) -> None:
        """After a forced stop: the tasks wait for the next start."""
        with anyio.CancelScope(shield=True):
            for task in tasks:
                await self._requeue(task)

    def _generate_apart(self, model: ModelInfo, jobs: list[Job]) -> list[GenerationResult | BaseException]:
        """After a batch ran out of memory: each job alone, so one that fits is not failed for the others."""
        outcomes: list[GenerationResult | BaseException] = []
        for job in jobs:
            try:
                outcomes.append(self._generate(model, [job])[0])
            except Exception as exc:  # each job's own outcome; the caller ends each task by it
                outcomes.append(exc)
        return outcomes

    # -- step-level batching --

    async def _step_level(self, batch: list[Assignment], portal: BlockingPortal, group: TaskGroup) -> None:
        """Tasks join the running step-level batch at its next step, or start one."""
        runs = await self._prepare_all(batch, portal)
        joining = self._steps is not None
        if self._steps is None:
            if not runs:
                await self._scheduler.send(EngineIdle(device=self.device, task_ids=[a.task.id for a in batch]))
                return
            self._steps = StepBatch()
        for run in runs:
            self._steps.add(run)
        for assignment in batch:
            if not any(run.assignment is assignment for run in runs):  # ended while it was prepared
                await self._scheduler.send(TaskLeft(task_id=assignment.task.id))
        if not joining:
            group.start_soon(self._run_steps, self._steps, portal)

    async def _run_steps(self, steps: StepBatch, portal: BlockingPortal) -> None:
        """Denoise until no task is left in the batch or waiting to join it; then report the engine idle."""

        def stop_all() -> None:
            for run in steps.runs.values():
                run.assignment.cancel.set(SHUTDOWN)

        def on_done(job: Job, outcome: GenerationResult | BaseException) -> None:
            portal.call(self._leave, steps, steps.run_of(job), outcome)

        try:
            while runs := steps.take_all():
                model = runs[0].model
                self._mark_used(model)
                try:
                    await self._thread.run_sync(self._denoise_steps, model, runs, steps, on_done, on_cancel=stop_all)
                except anyio.get_cancelled_exc_class():
                    await self._requeue_all(
                        [
                            run.assignment.task
                            for run in steps.runs.values()
                            if run.assignment.task.id not in steps.ended
                        ]
                    )
                    raise
                except Exception as exc:  # the whole batch failed (its model did not load, say)
                    for run in list(steps.runs.values()):
                        await self._leave(steps, run, exc)
                finally:
                    self._catalog.loaded(self.device, self._cache.loaded())
        finally:
            self._steps = None
            for task_id in steps.task_ids:
                self._hub.forget_progress(task_id)
            with anyio.CancelScope(shield=True):
                await self._scheduler.send(EngineIdle(device=self.device, task_ids=steps.task_ids))

    def _denoise_steps(
        self,
        model: ModelInfo,
        runs: list[_Run],
        steps: StepBatch,
        on_done: Callable[[Job, GenerationResult | BaseException], None],
    ) -> None:
        """On the device thread: the model (loaded if need be), then the step loop."""
        engine = self._cache.get(model)
        engine.run_steps([run.job for run in runs], on_done, steps.take, self._max_images, self._on_step)
        self._remeasure_after(model, runs[0].job)

    async def _leave(self, steps: StepBatch, run: _Run, outcome: GenerationResult | BaseException) -> None:
        """A task of the step-level batch is done: its last progress out, then its end, then its room free."""
        task_id = run.assignment.task.id
        if task_id in steps.ended:
            return
        steps.ended.add(task_id)
        with anyio.move_on_after(PROGRESS_FLUSH_S, shield=True):
            await run.progress.wait_delivered()
        with self._bound(run.assignment):
            await self._end(run.assignment, outcome, run.model)
        await self._scheduler.send(TaskLeft(task_id=task_id))

    async def _execute(self, batch: list[Assignment], portal: BlockingPortal) -> None:
        """Run one batch; every task in it ends (or goes back to the queue) before the engine reports idle."""
        try:
            if runs := await self._prepare_all(batch, portal):
                await self._run(runs)
        finally:
            for assignment in batch:
                self._hub.forget_progress(assignment.task.id)
            await self._scheduler.send(EngineIdle(device=self.device, task_ids=[a.task.id for a in batch]))

    @staticmethod
    def _bound(assignment: Assignment) -> Any:
        return structlog.contextvars.bound_contextvars(task_id=assignment.task.id, request_id=assignment.request_id)

    async def _prepare_all(self, batch: list[Assignment], portal: BlockingPortal) -> list[_Run]:
        """The runs of the tasks that can run (the others are ended here)."""
        runs = []
        for assignment in batch:
            with self._bound(assignment):
                run = await self._prepare(assignment, portal)
            if run is not None:
                runs.append(run)
        return runs

    async def _prepare(self, assignment: Assignment, portal: BlockingPortal) -> _Run | None:
        """The task's engine job, or None when it cannot run (it is then ended here)."""
        task = assignment.task
        try:
            model = self._catalog.find(task.spec.model)
            if model is None:
                raise ModelLoadError(task.spec.model, f"model {task.spec.model!r} is no longer configured")
            progress = LatestValue(portal, self._hub.publish)
            uploads = await anyio.to_thread.run_sync(self._upload_paths, task)  # may fetch them from the store
            return _Run(assignment, model, self._job(task, assignment.cancel, progress, model, uploads), progress)
        except (ModelLoadError, AssetError) as exc:
            await self._end(assignment, exc)
            return None

    async def _run(self, runs: list[_Run]) -> None:
        model, jobs = runs[0].model, [run.job for run in runs]
        self._mark_used(model)

        def stop_all() -> None:
            for run in runs:
                run.assignment.cancel.set(SHUTDOWN)

        outcomes: list[GenerationResult | BaseException]
        try:
            try:
                try:
                    outcomes = list(await self._thread.run_sync(self._generate, model, jobs, on_cancel=stop_all))
                except OutOfMemory:
                    if len(jobs) == 1:
                        raise
                    log.warning(
                        "engine %s: a batch of %d ran out of memory; running its jobs apart", self.device, len(jobs)
                    )
                    outcomes = await self._thread.run_sync(self._generate_apart, model, jobs, on_cancel=stop_all)
                finally:
                    self._catalog.loaded(self.device, self._cache.loaded())
            finally:  # the last step's progress goes out before each task's final event, never after it
                with anyio.move_on_after(PROGRESS_FLUSH_S, shield=True):
                    for run in runs:
                        await run.progress.wait_delivered()
        except anyio.get_cancelled_exc_class():
            await self._requeue_all([run.assignment.task for run in runs])
            raise
        except Exception as exc:  # the batch as a whole failed: every task in it ends the same way
            outcomes = [exc] * len(runs)
        for run, outcome in zip(runs, outcomes, strict=True):
            with self._bound(run.assignment):
                await self._end(run.assignment, outcome, run.model)

    async def _end(
        self, assignment: Assignment, outcome: GenerationResult | BaseException, model: ModelInfo | None = None
    ) -> None:
        """Hand a task's images on, or end it by what went wrong."""
        task, cancel = assignment.task, assignment.cancel
        if cancel.reason == CLAIM_LOST:
            log.warning(
                "engine %s: task %s attempt %d was given to a newer attempt; dropped",
                self.device,
                task.id,
                task.attempt,
            )
            return
        if isinstance(outcome, GenerationResult) and cancel.is_set() and cancel.reason != SHUTDOWN:
            outcome = JobCancelled()  # cancelled while the rest of its batch went on
        match outcome:
            case GenerationResult() if model is not None:
                await self._postprocess.send(
                    Generated(
                        task=task,
                        images=outcome.images,
                        model=model,
                        device=self.device,
                        denoise_s=outcome.denoise_s,
                        request_id=assignment.request_id,
                    )
                )
            case JobCancelled() if cancel.reason == SHUTDOWN:
                await self._requeue(task)
            case JobCancelled():
                await cancel_task(self._store, self._hub, task, [TaskState.RUNNING])
            case OutOfMemory():
                await self._fail(
                    task,
                    "out_of_memory",
                    f"{self.device} ran out of memory; try a smaller size or fewer images ({outcome})",
                )
            case ModelLoadError():
                self._catalog.failed(self.device, outcome.model_id, str(outcome))
                await self._fail(task, "model_unavailable", str(outcome))
            case AssetError():
                await self._fail(task, outcome.code, str(outcome))
            case BaseException():
                log.error("engine %s: task %s failed", self.device, task.id, exc_info=outcome)
                await self._fail(task, "engine_error", f"{type(outcome).__name__}: {outcome}")
            case _:
                raise AssertionError("a result comes with its model")

    async def _fail(self, task: TaskRecord, code: str, message: str) -> None:
        await fail_task(self._store, self._hub, task, [TaskState.RUNNING], code, message)

    async def _requeue(self, task: TaskRecord) -> None:
        """Stopped by a shutdown, not by its own fault: it waits, same attempt, for the next start."""
        await self._store.transition(
            task.id, attempt=task.attempt, from_states=[TaskState.RUNNING], to=TaskState.QUEUED
        )

    def _upload_paths(self, task: TaskRecord) -> dict[str, Path | None]:
        spec = task.spec
        names = [c.image for c in spec.control if c.image is not None] + [spec.init_image, spec.mask]
        names += [reference.image for reference in spec.references]
        return {name: self._uploads.path(name) for name in names if name is not None}

    def _job(
        self,
        task: TaskRecord,
        cancel: CancelFlag,
        progress: LatestValue[AnyTaskEvent],
        model: ModelInfo,
        uploads: dict[str, Path | None],
    ) -> Job:
        """The engine's job: names resolved to files now (a LoRA or upload may have gone since the request)."""
        spec = task.spec
        loras = []
        for lora in spec.loras:
            path = self._loras.path(lora.name)
            if path is None:
                raise AssetError("lora_missing", self._loras.missing_message(lora.name))
            loras.append(LoraWeight(name=lora.name, path=str(path), weight=lora.weight))
        controls = []
        for control in spec.control:
            image = None
            if control.image is not None:
                upload = uploads.get(control.image)
                if upload is None:
                    raise AssetError("control_invalid", f"the upload {control.image} is gone")
                image = str(upload)
            controls.append(
                ControlJob(
                    type=control.type,
                    image=image,
                    pose=control.pose,
                    preprocess=bool(control.preprocess),
                    strength=control.strength,
                    start=control.start,
                    end=control.end,
                )
            )

        image_edit = None
        if spec.init_image is not None:
            init, mask = uploads.get(spec.init_image), uploads.get(spec.mask) if spec.mask else None
            if init is None or (spec.mask is not None and mask is None):
                raise AssetError("image_invalid", "the init image or mask upload is gone")
            image_edit = ImageEdit(
                init_image=str(init),
                strength=spec.strength or 0.0,  # resolve sets it whenever there is an init image
                mask=str(mask) if mask is not None else None,
                mask_blur=spec.mask_blur,
                inpaint_area=spec.inpaint_area,
                inpaint_padding=spec.inpaint_padding,
            )

        references = None
        if spec.references and spec.ip_adapter is not None:
            images = []
            for reference in spec.references:
                file = uploads.get(reference.image)
                if file is None:
                    raise AssetError("image_invalid", f"the reference image upload {reference.image} is gone")
                images.append(
                    Reference(
                        image=str(file),
                        strength=reference.strength,
                        mode=reference.mode,
                        start=reference.start,
                        end=reference.end,
                    )
                )
            source = model.ip_adapters.get(spec.ip_adapter)
            if source is None:
                raise AssetError("ip_adapter_unavailable", f"no IP-Adapter {spec.ip_adapter!r} for {model.id}")
            references = References(adapter=spec.ip_adapter, source=source, images=images)

        vae = None
        if spec.vae is not None:
            vae_source = model.vaes.get(spec.vae)
            if vae_source is None:
                raise AssetError("vae_unavailable", f"the VAE {spec.vae!r} is no longer configured")
            vae = Vae(name=spec.vae, source=vae_source)
        hires = _hires(spec, model)

        def on_progress(step: int, total: int, preview: Image | None) -> None:
            event = Progress(
                task_id=task.id,
                step=step,
                total=total,
                preview_jpeg_b64=_jpeg_b64(preview) if preview is not None else None,
            )
            progress.put(event)

        job = job_for(
            spec,
            model,
            loras=loras,
            controls=controls,
            preview_every=self._previews.every,
            preview_size=self._previews.size,
            wants_preview=lambda: self._hub.has_subscribers(task.id),
            on_progress=on_progress,
            cancel=cancel,
            image_edit=image_edit,
            references=references,
            vae=vae,
            hires=hires,
        )
        if spec.views or spec.variants:
            return replace(job, views=image_jobs(spec, job, partial(_hires, model=model)))
        return job


def _hires(spec: GenerationSpec, model: ModelInfo) -> Hires | None:
    """The engine's hires fix: an upscaler model's name resolved to its file now (it may have gone since)."""
    if spec.hires is None:
        return None
    from engines.upscale import UPSCALER_SUFFIXES

    upscaler = spec.hires.upscaler
    if upscaler not in HIRES_UPSCALERS:
        found = ModelFiles(Path(model.upscalers_dir or "."), UPSCALER_SUFFIXES).path(upscaler)
        if found is None:
            raise AssetError("postprocess_model_missing", f"the upscaler {upscaler!r} is not installed any more")
        upscaler = str(found)
    given = spec.hires
    return Hires(
        upscaler=upscaler,
        upscale_width=given.upscale_width,
        upscale_height=given.upscale_height,
        width=given.width,
        height=given.height,
        steps=given.steps,
        denoise=given.denoise,
    )
