"""A fleet on one Redis: what every node runs beside its role's actors.

- `FleetLive`, `FleetCanceller`, `FleetModels`: ingress's view of tasks, cancels and models through Redis.
- `Reaper` (every node): claims silent for `claim_timeout_s` go back to the queue with attempt+1.
- `StoreHealth` (every node): pings Redis, for /readyz.
- `FleetWorker` (workers): heartbeats the claims whose engines make progress, hears wakes and cancels, tells
  the fleet which models its devices hold, and loads or unloads models when an API node asks.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import anyio
import msgspec
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectSendStream

from actors.engine import CLAIM_LOST, EngineActor
from actors.hub import Events
from actors.ingress import Live
from actors.model_catalog import ModelCatalog, ModelStatus
from actors.redis_store import P, RedisStore, is_outage
from actors.scheduler import Scheduler
from forge.engine import ModelInfo, ModelLoadError
from forge.errors import Conflict, ForgeError, ModelUnavailable, StoreUnavailable
from forge.events import TERMINAL_EVENTS, AnyTaskEvent, Postprocessing, Progress, Started
from forge.messages import Cancel, SchedulerInbox, Wake
from forge.tasks import TaskRecord

log = logging.getLogger(__name__)

WORKERS = f"{P}workers"
CONTROL = f"{P}control"
REGISTRY_EVERY_S = 1.0
REGISTRY_STALE_S = 5.0
MODEL_COMMAND_WAIT_S = 600.0


class DeviceState(msgspec.Struct, frozen=True):
    loaded: dict[str, int] = {}
    loading: str | None = None


class WorkerState(msgspec.Struct, frozen=True):
    """What a worker tells the fleet about itself, every second (`forge:workers`)."""

    name: str
    at: float
    devices: dict[str, DeviceState]
    errors: dict[str, str] = {}


class ModelCommand(msgspec.Struct, frozen=True):
    op: str  # "load" | "unload"
    model: str


async def _forgiving(what: str, fn: object) -> None:
    """A periodic fleet chore: an outage skips a round, never ends the node."""
    try:
        await fn()  # type: ignore[operator]
    except Exception as exc:
        if not (is_outage(exc) or isinstance(exc, ForgeError)):
            raise
        log.debug("%s skipped: %s", what, exc)


@dataclass(frozen=True)
class FleetLive:
    store: RedisStore

    async def live(self, task: TaskRecord) -> Live:
        device, batch, worker = await self.store.placement(task.id)
        return Live(
            position=await self.store.position(task.id),
            progress=await self.store.latest_progress(task.id),
            device=device,
            batch=batch,
            worker=worker,
        )


@dataclass(frozen=True)
class FleetCanceller:
    store: RedisStore

    async def cancel(self, task: TaskRecord) -> None:
        await self.store.request_cancel(task.id)


@dataclass(frozen=True)
class FleetModels:
    """Models as the fleet's live workers report them; loads and unloads go to every worker through Redis."""

    store: RedisStore
    catalog: ModelCatalog

    async def workers(self) -> list[WorkerState]:
        raw = await self.store.call(self.store.client.hgetall, WORKERS)
        now = time.time()
        states = [msgspec.json.decode(value, type=WorkerState) for value in raw.values()]
        return [state for state in states if now - state.at < REGISTRY_STALE_S]

    async def statuses(self) -> list[ModelStatus]:
        view = ModelCatalog([self.catalog.find(i) for i in self.catalog.ids()], self.catalog.default.id)  # type: ignore[misc]
        for worker in await self.workers():
            for device, state in worker.devices.items():
                where = f"{worker.name}/{device}"
                view.loaded(where, state.loaded)
                if state.loading:
                    view.loading(where, state.loading)
            for model_id, error in worker.errors.items():
                view.failed("", model_id, error)
        return view.statuses()

    async def load(self, model: ModelInfo) -> None:
        await self._command(ModelCommand(op="load", model=model.id), lambda d: model.id in d.loaded)

    async def unload(self, model_id: str) -> None:
        if model_id == self.catalog.default.id:
            raise Conflict(f"{model_id} is the default model and stays loaded", field="id", rule="pinned")
        await self._command(ModelCommand(op="unload", model=model_id), lambda d: model_id not in d.loaded)

    async def _command(self, command: ModelCommand, done: object) -> None:
        sent = time.time()
        send = partial(self.store.client.xadd, CONTROL, {"c": msgspec.json.encode(command)}, maxlen=1000)
        await self.store.call(send)
        with anyio.move_on_after(MODEL_COMMAND_WAIT_S):
            while True:
                workers = [w for w in await self.workers() if w.at > sent]
                failed = [w.errors[command.model] for w in workers if command.model in w.errors]
                if command.op == "load" and failed:
                    raise ModelUnavailable(failed[0], field="id", rule="load_failed")
                if workers and all(done(d) for w in workers for d in w.devices.values()):  # type: ignore[operator]
                    return
                await anyio.sleep(0.2)


class Reaper:
    def __init__(self, store: RedisStore, claim_timeout_s: float, max_attempts: int) -> None:
        self._store = store
        self._timeout = claim_timeout_s
        self._max_attempts = max_attempts

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await _forgiving("reaping", self.reap_once)
            await anyio.sleep(max(self._timeout / 4, 0.25))

    async def reap_once(self) -> None:
        requeued, failed = await self._store.reap(self._timeout, self._max_attempts)
        if requeued or failed:
            log.warning("claims silent for %.0f s: %d task(s) queued again, %d failed", self._timeout, requeued, failed)


class StoreHealth:
    """Pings Redis each second for readiness, and reads the fleet's queue length for `/metrics`."""

    def __init__(self, store: RedisStore) -> None:
        self._store = store
        self.queued = 0

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        was = True
        while True:
            now = await self._store.check()
            if now:
                with contextlib.suppress(StoreUnavailable):
                    self.queued = await self._store.queued()
            if now != was:
                (log.info if now else log.error)("the store (Redis) is %s", "back" if now else "unreachable")
                was = now
            await anyio.sleep(1.0)


class FleetWorker:
    def __init__(
        self,
        *,
        name: str,
        store: RedisStore,
        hub: Events,
        scheduler: Scheduler,
        scheduler_inbox: MemoryObjectSendStream[SchedulerInbox],
        catalog: ModelCatalog,
        engines: Sequence[EngineActor],
        claim_timeout_s: float,
    ) -> None:
        self.name = name
        self._store = store
        self._scheduler = scheduler
        self._inbox = scheduler_inbox
        self._catalog = catalog
        self._engines = engines
        self._timeout = claim_timeout_s
        self._claims: dict[str, int] = {}  # task id -> attempt, from its start on this worker to its end
        self._progressed: dict[str, float] = {}  # task id -> when its engine or post-processor last moved it
        hub.add_tap(self._observe)

    def _observe(self, event: AnyTaskEvent) -> None:
        match event:
            case Started(worker=worker) if worker == self.name:
                self._claims[event.task_id] = event.attempt
                self._progressed[event.task_id] = time.monotonic()
            case Progress() | Postprocessing() if event.task_id in self._claims:
                self._progressed[event.task_id] = time.monotonic()
            case _ if isinstance(event, TERMINAL_EVENTS):
                self._forget(event.task_id)

    def _forget(self, task_id: str) -> None:
        self._claims.pop(task_id, None)
        self._progressed.pop(task_id, None)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._heartbeats)
            tg.start_soon(self._announce)
            tg.start_soon(self._listen)
            tg.start_soon(self._model_commands)
            task_status.started()

    # -- claims --

    def _alive(self, task_id: str, loading_tasks: set[str]) -> bool:
        """A claim is kept only while its work moves: a step, a post-processing step, or a model loading for it."""
        return task_id in loading_tasks or time.monotonic() - self._progressed.get(task_id, 0.0) < self._timeout

    async def _heartbeats(self) -> None:
        while True:
            await anyio.sleep(max(self._timeout / 3, 0.2))
            await _forgiving("heartbeat", self._beat)

    async def _beat(self) -> None:
        loading = {device for device, model in self._catalog.loading_devices().items() if model}
        loading_tasks = {task.id for task, device in self._scheduler.running_tasks() if device in loading}
        claims = [
            (task_id, attempt) for task_id, attempt in self._claims.items() if self._alive(task_id, loading_tasks)
        ]
        if not claims:
            return
        answer: int
        for (task_id, _), answer in zip(claims, await self._store.heartbeat(self.name, claims), strict=True):
            if answer == 0:  # the reaper gave it to a newer attempt: this run stops and writes nothing
                log.warning("lost the claim on task %s; stopping its run here", task_id)
                self._scheduler.interrupt(task_id, CLAIM_LOST)
                self._forget(task_id)
            elif answer == 2:  # a cancel whose announcement this worker missed
                await self._inbox.send(Cancel(task_id=task_id))

    # -- what the fleet says to this worker --

    async def _listen(self) -> None:
        while True:
            try:
                async with self._store.client.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(f"{P}wake", f"{P}cancel")
                    await self._inbox.send(Wake())  # anything queued while this worker was not listening
                    while True:
                        # A bounded wait, below the socket timeout: a quiet channel is not a dead connection.
                        message = await pubsub.get_message(timeout=1.0)
                        if message is None:
                            continue
                        if message["channel"] == f"{P}cancel":
                            if message["data"] in self._claims:
                                await self._inbox.send(Cancel(task_id=message["data"]))
                        else:
                            await self._inbox.send(Wake())
            except Exception as exc:
                if not is_outage(exc):
                    raise
                await anyio.sleep(1.0)

    async def _model_commands(self) -> None:
        last = "$"
        while True:
            try:
                replies: Any = await self._store.client.xread({CONTROL: last}, count=16, block=2000)
            except Exception as exc:
                if not is_outage(exc):
                    raise
                await anyio.sleep(1.0)
                continue
            for _, entries in replies:
                for entry_id, fields in entries:
                    last = entry_id
                    await self._apply(msgspec.json.decode(fields["c"], type=ModelCommand))

    async def _apply(self, command: ModelCommand) -> None:
        model = self._catalog.find(command.model)
        if model is None:
            return
        for engine in self._engines:
            try:
                if command.op == "load":
                    await engine.load_model(model)
                else:
                    await engine.unload_model(model.id)
            except ModelLoadError as exc:
                log.error("loading %s asked by the fleet failed: %s", model.id, exc)
        await _forgiving("announcing this worker", self._announce_once)

    async def _announce(self) -> None:
        try:
            while True:
                await _forgiving("announcing this worker", self._announce_once)
                await anyio.sleep(REGISTRY_EVERY_S)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                await _forgiving("leaving the fleet", lambda: self._store.client.hdel(WORKERS, self.name))

    async def _announce_once(self) -> None:
        loading = self._catalog.loading_devices()
        state = WorkerState(
            name=self.name,
            at=time.time(),
            devices={
                engine.device: DeviceState(
                    loaded=self._catalog.loaded_on(engine.device), loading=loading.get(engine.device)
                )
                for engine in self._engines
            },
            errors=self._catalog.errors(),
        )
        await self._store.client.hset(WORKERS, self.name, msgspec.json.encode(state))
