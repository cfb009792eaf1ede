"""Ingress: validates a request against the model and config, persists it, then hands it to the scheduler.

A task exists, and may be acknowledged to the client, only once the store has committed it (with its queue
entry, in a fleet). Adapters reach tasks, models and files only through ingress and the store.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Literal, Protocol

import anyio
import msgspec
import structlog
from anyio.streams.memory import MemoryObjectSendStream

from actors.character_library import CharacterLibrary
from actors.files import Files
from actors.hub import Events
from actors.model_catalog import ModelCatalog, ModelStatus
from actors.result_index import ResultIndex
from actors.store import Admission, IdempotencyConflict, TaskStore
from actors.uploads import UploadStore
from forge.auth import LOCAL, Principal
from forge.config import Config
from forge.engine import ModelInfo
from forge.errors import Conflict, Forbidden, InvalidRequest, NotFound, ServiceUnavailable
from forge.events import TERMINAL_EVENTS, Progress
from forge.logs import request_id as forge_request_id
from forge.messages import SchedulerInbox, Submit
from forge.requests import CharacterUsed, ControlRequest, GenerationRequest, GenerationSpec
from forge.resolve import Resources, check_reference_count, requested_controls, resolve_request
from forge.tasks import TaskRecord, TaskState

DEFAULT_OWNER = "local"
log = logging.getLogger(__name__)
CANCEL_WAIT_S = 10.0


# A submission's task: a new one, the earlier one with the same Idempotency-Key, or an earlier one with the
# same images (the result cache).
Reuse = Literal["new", "idempotent", "cached"]


@dataclass(frozen=True)
class Live:
    """What a task's row does not say: where it stands in the queue, how far it is, where it runs."""

    position: int | None = None
    progress: Progress | None = None
    device: str = ""
    batch: int = 0
    worker: str = ""


class LiveState(Protocol):
    async def live(self, task: TaskRecord) -> Live: ...


class Canceller(Protocol):
    async def cancel(self, task: TaskRecord) -> None:
        """Ask for the task's end: a queued one ends now; a running one at its engine's next step."""
        ...


class ModelControl(Protocol):
    """The models every engine (of this box, or of the fleet's workers) holds, and loading or unloading them."""

    async def statuses(self) -> list[ModelStatus]: ...

    async def load(self, model: ModelInfo) -> None: ...

    async def unload(self, model_id: str) -> None: ...


class Ingress:
    def __init__(
        self,
        *,
        config: Config,
        catalog: ModelCatalog,
        resources: Resources,
        uploads: UploadStore,
        store: TaskStore,
        hub: Events,
        live: LiveState,
        canceller: Canceller,
        models: ModelControl,
        characters: CharacterLibrary,
        results: Files | None = None,
        result_index: ResultIndex | None = None,
        scheduler_inbox: MemoryObjectSendStream[SchedulerInbox] | None = None,
        on_submitted: Callable[[Reuse], None] | None = None,
    ) -> None:
        """`scheduler_inbox`: this box's scheduler, which keeps the queue (None in a fleet: the store does).
        `on_submitted`: told of each submission answered, with how (new, idempotent, cached)."""
        self._config = config
        self._live = live
        self._canceller = canceller
        self.models = models
        self.characters = characters
        self._results = results
        self._result_index = result_index if config.result_cache and results is not None else None
        self.catalog = catalog
        self.resources = resources
        self.uploads = uploads
        self._store = store
        self._hub = hub
        self._scheduler_inbox = scheduler_inbox
        self._on_submitted = on_submitted
        self.accepting = True

    def close(self) -> None:
        """Stop taking new work (shutdown); everything already accepted stays in the store."""
        self.accepting = False

    @property
    def model(self) -> ModelInfo:
        """The default model."""
        return self.catalog.default

    def resolve(
        self,
        request: GenerationRequest,
        init_size: tuple[int, int] | None = None,
        character: CharacterUsed | None = None,
    ) -> GenerationSpec:
        return resolve_request(request, self.catalog.get(request.model), self.resources, init_size, character)

    async def _resolve(self, request: GenerationRequest, owner: str) -> tuple[GenerationSpec, bool]:
        """The character's description and defaults first; images sent inline become uploads, so the stored
        task holds ids, not megabytes. Also: whether the seed was chosen (by the request or its character)."""
        check_reference_count(request, self.resources)  # before its images are stored
        request, character = await self.characters.apply(request, owner)
        request = await self._store_inline_images(request)
        init_size = None
        if request.init_image is not None:
            init_size = await anyio.to_thread.run_sync(self.uploads.size, request.init_image)
        return self.resolve(request, init_size, character), request.seed is not None

    async def _upload(self, image: str, field: str) -> str:
        return await anyio.to_thread.run_sync(partial(self.uploads.save_inline, image, field=field))

    async def _store_inline_images(self, request: GenerationRequest) -> GenerationRequest:
        """Every image of the request (control, init image, mask, references) as an upload id."""
        changes: dict[str, object] = {
            field: await self._upload(image, field)
            for field in ("init_image", "mask")
            if (image := getattr(request, field)) is not None
        }
        controls = requested_controls(request)
        if any(control.image is not None for _, control in controls):
            stored: list[ControlRequest] = []
            for field, control in controls:
                if control.image is not None:
                    control = msgspec.structs.replace(
                        control, image=await self._upload(control.image, f"{field}.image")
                    )
                stored.append(control)
            changes["control"] = stored[0] if isinstance(request.control, ControlRequest) else stored
        if request.references:
            changes["references"] = [
                msgspec.structs.replace(
                    reference, image=await self._upload(reference.image, f"references[{index}].image")
                )
                for index, reference in enumerate(request.references)
            ]
        return msgspec.structs.replace(request, **changes) if changes else request

    async def submit(
        self,
        request: GenerationRequest,
        *,
        principal: Principal = LOCAL,
        idempotency_key: str | None = None,
        request_id: str | None = None,
    ) -> tuple[TaskRecord, Reuse]:
        """Returns the committed task, and whether it is new, the earlier submission with the same key, or an
        earlier task with the same images (the result cache)."""
        with structlog.contextvars.bound_contextvars(request_id=request_id or forge_request_id()):
            record, reuse = await self._submit(request, principal, idempotency_key)
        if self._on_submitted is not None:
            self._on_submitted(reuse)
        return record, reuse

    async def _submit(
        self, request: GenerationRequest, principal: Principal, idempotency_key: str | None
    ) -> tuple[TaskRecord, Reuse]:
        owner = principal.owner
        if not self.accepting:
            raise ServiceUnavailable("the server is shutting down; retry shortly")
        request_hash = hashlib.sha256(msgspec.json.encode(request)).hexdigest()
        spec, seed_chosen = await self._resolve(request, owner)
        if idempotency_key is not None:  # a replay is free: it passes no limit
            earlier = await self._replay(owner, idempotency_key, request_hash)
            if earlier is not None:
                return earlier, "idempotent"
        fingerprint = self._fingerprint(spec) if seed_chosen and self._result_index is not None else None
        if fingerprint is not None:  # the same images exist already: no limit, no GPU
            cached = await self._cached(owner, fingerprint)
            if cached is not None:
                log.info("task %s answered from the result cache", cached.id, extra={"task_id": cached.id})
                return cached, "cached"
        try:
            record = await self._store.insert(
                owner=owner,
                spec=spec,
                admission=self._admission(principal),
                idempotency_key=idempotency_key,
                request_hash=request_hash,
            )
        except IdempotencyConflict as taken:  # the same key, submitted concurrently, won the race
            earlier = await self._replay(owner, idempotency_key or "", request_hash)
            if earlier is None:
                raise ServiceUnavailable(f"task {taken.task_id} is being recorded; retry") from None
            return earlier, "idempotent"
        if fingerprint is not None and self._result_index is not None:
            await anyio.to_thread.run_sync(self._result_index.remember, owner, fingerprint, record.id)
        request_id = str(structlog.contextvars.get_contextvars().get("request_id", ""))
        log.info("accepted task %s", record.id, extra={"task_id": record.id})
        if self._scheduler_inbox is not None:
            await self._scheduler_inbox.send(Submit(task=record, request_id=request_id))
        return record, "new"

    def _fingerprint(self, spec: GenerationSpec) -> str:
        """What decides the images: the spec (its priority aside), the model's weights and the backend."""
        model = self.catalog.find(spec.model)
        weights = f"{model.path}|{model.variant}" if model is not None else spec.model
        identity = msgspec.json.encode(msgspec.structs.replace(spec, priority=0))
        return hashlib.sha256(identity + f"|{weights}|{self._config.backend}".encode()).hexdigest()

    async def _cached(self, owner: str, fingerprint: str) -> TaskRecord | None:
        """The owner's earlier task with these images, while it succeeded and its files are kept."""
        assert self._result_index is not None and self._results is not None
        task_id = await anyio.to_thread.run_sync(self._result_index.find, owner, fingerprint)
        if task_id is None:
            return None
        try:
            record = await self.get(task_id, owner=owner)
        except NotFound:
            return None
        if record.state is not TaskState.SUCCEEDED or record.metadata_path is None:
            return None
        kept = await anyio.to_thread.run_sync(self._results.read, record.metadata_path)
        return record if kept is not None else None

    def _admission(self, principal: Principal) -> Admission:
        """Refuse new work while the queue is full or the owner's plan has no room."""
        plan = self._config.plans.get(principal.plan)
        if plan is None:
            raise Forbidden(f"unknown plan {principal.plan!r}", field="plan")
        return Admission(max_queue=self._config.max_queue, plan_name=principal.plan, plan=plan)

    async def _replay(self, owner: str, key: str, request_hash: str) -> TaskRecord | None:
        found = await self._store.find_idempotent(owner, key)
        if found is None:
            return None
        record, earlier_hash = found
        if earlier_hash != request_hash:
            raise InvalidRequest(
                "this Idempotency-Key was used for a different request", field="Idempotency-Key", rule="reused"
            )
        return record

    @property
    def storage_full(self) -> bool:
        """Accepted work is waiting for disk space to be recorded."""
        return self._store.disk.full

    async def get(self, task_id: str, *, owner: str | None = DEFAULT_OWNER) -> TaskRecord:
        """The task if `owner` may see it (None: any owner, for admins); another owner's is not found."""
        record = await self._store.get(task_id)
        if record is None or (owner is not None and record.owner != owner):
            raise NotFound(f"no generation with id {task_id!r}", field="id")
        return record

    async def cancel(self, task_id: str, *, owner: str | None = DEFAULT_OWNER) -> TaskRecord:
        """Cancel exactly this task, queued or running (on any worker); waits briefly for it to stop."""
        record = await self.get(task_id, owner=owner)
        if record.state is TaskState.CANCELLED:
            return record
        if record.state.is_terminal:
            raise Conflict(f"generation {task_id} already ended as {record.state}", field="id", rule="state")
        async with self._hub.subscribe(task_id) as events:
            await self._canceller.cancel(record)
            with anyio.move_on_after(CANCEL_WAIT_S):
                current = await self.get(task_id, owner=owner)
                if not current.state.is_terminal:
                    async for event in events:
                        if isinstance(event, TERMINAL_EVENTS):
                            break
        return await self.get(task_id, owner=owner)

    async def live(self, record: TaskRecord) -> Live:
        return await self._live.live(record)

    # -- models --

    async def model_statuses(self) -> list[ModelStatus]:
        return await self.models.statuses()

    async def model_status(self, model_id: str) -> ModelStatus:
        status = next((s for s in await self.models.statuses() if s.id == model_id), None)
        if status is None:
            raise NotFound(f"no model {model_id!r}", field="id")
        return status

    async def list(
        self,
        *,
        owner: str | None = DEFAULT_OWNER,
        state: TaskState | None = None,
        limit: int = 20,
        before_seq: int | None = None,
        before_id: str | None = None,
    ) -> list[TaskRecord]:
        return await self._store.list(owner=owner, state=state, limit=limit, before_seq=before_seq, before_id=before_id)
