"""One box (SQLite store): the scheduler keeps the queue, cancels go to it, and models load on its engines."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from anyio.streams.memory import MemoryObjectSendStream

from actors.engine import EngineActor
from actors.hub import Events
from actors.ingress import Live
from actors.model_catalog import ModelCatalog, ModelStatus
from actors.scheduler import Scheduler
from forge.engine import ModelInfo, ModelLoadError
from forge.errors import Conflict, ModelUnavailable
from forge.messages import Cancel, SchedulerInbox
from forge.tasks import TaskRecord


@dataclass(frozen=True)
class BoxLive:
    scheduler: Scheduler
    hub: Events

    async def live(self, task: TaskRecord) -> Live:
        device, batch = self.scheduler.placement(task.id)
        return Live(
            position=self.scheduler.position(task),
            progress=self.hub.latest_progress(task.id),
            device=device,
            batch=batch,
        )


@dataclass(frozen=True)
class BoxCanceller:
    scheduler_inbox: MemoryObjectSendStream[SchedulerInbox]

    async def cancel(self, task: TaskRecord) -> None:
        await self.scheduler_inbox.send(Cancel(task_id=task.id))


@dataclass(frozen=True)
class BoxModels:
    catalog: ModelCatalog
    engines: Sequence[EngineActor]

    async def statuses(self) -> list[ModelStatus]:
        return self.catalog.statuses()

    async def load(self, model: ModelInfo) -> None:
        for engine in self.engines:
            try:
                await engine.load_model(model)
            except ModelLoadError as exc:
                raise ModelUnavailable(str(exc), field="id", rule="load_failed") from None

    async def unload(self, model_id: str) -> None:
        if model_id == self.catalog.default.id:
            raise Conflict(f"{model_id} is the default model and stays loaded", field="id", rule="pinned")
        for engine in self.engines:
            await engine.unload_model(model_id)
