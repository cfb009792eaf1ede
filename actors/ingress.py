"""Ingress: validates a request against the model and config, persists it, then hands it to the scheduler.

A task exists, and may be acknowledged to the client, only once its `queued` row is committed.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
from functools import partial

import anyio
import msgspec
import structlog
from anyio.streams.memory import MemoryObjectSendStream

from actors.hub import EventHub
from actors.model_catalog import ModelCatalog
from actors.rate_limits import RateLimiter
from actors.store import Store
from actors.uploads import UploadStore
from forge.auth import LOCAL, Principal
from forge.config import Config
from forge.engine import ModelInfo
from forge.errors import Conflict, InvalidRequest, NotFound, ServiceUnavailable
from forge.events import TERMINAL_EVENTS
from forge.logs import request_id as forge_request_id
from forge.messages import Cancel, SchedulerInbox, Submit
from forge.nodes import node_of
from forge.requests import ControlRequest, GenerationRequest, GenerationSpec
from forge.resolve import Resources, requested_controls, resolve_request
from forge.tasks import ACTIVE_STATES, TaskRecord, TaskState

DEFAULT_OWNER = "local"
log = logging.getLogger(__name__)
CANCEL_WAIT_S = 10.0


class Ingress:
    def __init__(
        self,
        *,
        config: Config,
        catalog: ModelCatalog,
        resources: Resources,
        uploads: UploadStore,
        store: Store,
        hub: EventHub,
        scheduler_inbox: MemoryObjectSendStream[SchedulerInbox],
        limiter: RateLimiter | None = None,
    ) -> None:
        self._limiter = limiter
        self._config = config
        self.catalog = catalog
        self.resources = resources
        self.uploads = uploads
        self._store = store
        self._hub = hub
        self._scheduler_inbox = scheduler_inbox
        self.accepting = True
        self._admission = anyio.Lock()

    def set_limiter(self, limiter: RateLimiter) -> None:
        self._limiter = limiter

    def close(self) -> None:
        """Stop taking new work (shutdown); everything already accepted stays in the store."""
        self.accepting = False

    @property
    def model(self) -> ModelInfo:
        """The default model."""
        return self.catalog.default

    def resolve(self, request: GenerationRequest) -> GenerationSpec:
        return resolve_request(request, self.catalog.get(request.model), self.resources)

    async def _store_inline_images(self, request: GenerationRequest) -> GenerationRequest:
        """Control images sent inline become uploads, so the stored task holds an id, not megabytes."""
        controls = requested_controls(request)
        if not any(control.image is not None for _, control in controls):
            return request
        stored: list[ControlRequest] = []
        for field, control in controls:
            if control.image is not None:
                save = partial(self.uploads.save_inline, control.image, field=f"{field}.image")
                upload_id = await anyio.to_thread.run_sync(save)
                control = msgspec.structs.replace(control, image=upload_id)
            stored.append(control)
        single = isinstance(request.control, ControlRequest)
        return msgspec.structs.replace(request, control=stored[0] if single else stored)

    async def submit(
        self,
        request: GenerationRequest,
        *,
        principal: Principal = LOCAL,
        idempotency_key: str | None = None,
        request_id: str | None = None,
    ) -> tuple[TaskRecord, bool]:
        """Returns the committed task and whether it was an earlier submission with the same key."""
        with structlog.contextvars.bound_contextvars(request_id=request_id or forge_request_id()):
            return await self._submit(request, principal, idempotency_key)

    async def _submit(
        self, request: GenerationRequest, principal: Principal, idempotency_key: str | None
    ) -> tuple[TaskRecord, bool]:
        owner = principal.owner
        if not self.accepting:
            raise ServiceUnavailable("the server is shutting down; retry shortly")
        request_hash = hashlib.sha256(msgspec.json.encode(request)).hexdigest()
        spec = self.resolve(await self._store_inline_images(request))
        if idempotency_key is not None:
            earlier = await self._replay(owner, idempotency_key, request_hash)
            if earlier is not None:
                return earlier, True
        try:
            # Counting and inserting under one lock: concurrent submissions cannot both take the last place.
            async with self._admission:
                await self._admit(principal)
                record = await self._store.insert(
                    owner=owner, spec=spec, idempotency_key=idempotency_key, request_hash=request_hash
                )
        except sqlite3.IntegrityError:  # the same key, submitted concurrently, won the race
            earlier = await self._replay(owner, idempotency_key or "", request_hash)
            if earlier is None:
                raise
            return earlier, True
        request_id = str(structlog.contextvars.get_contextvars().get("request_id", ""))
        log.info("accepted task %s", record.id, extra={"task_id": record.id})
        await self._scheduler_inbox.send(Submit(task=record, request_id=request_id))
        return record, False

    async def _admit(self, principal: Principal) -> None:
        """Refuse new work while the queue is full or the owner's plan has no room (replays are free)."""
        if await self._store.count([TaskState.QUEUED]) >= self._config.max_queue:
            raise ServiceUnavailable(
                f"the queue is full ({self._config.max_queue} tasks); retry later", retry_after_s=30
            )
        if self._limiter is not None:
            in_flight = await self._store.count([TaskState.QUEUED, *ACTIVE_STATES], owner=principal.owner)
            self._limiter.admit(principal, in_flight)

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
            raise NotFound(self._not_here(task_id), field="id")
        return record

    def _not_here(self, task_id: str) -> str:
        node = node_of(task_id)
        if node is None or node == self._config.node_id:
            return f"no generation with id {task_id!r}"
        where = self._config.peers.get(node)
        at = f" at {where}" if where else ", which is not among this server's peers"
        return f"no generation with id {task_id!r} here: it was made by server {node!r}{at}"

    async def cancel(self, task_id: str, *, owner: str | None = DEFAULT_OWNER) -> TaskRecord:
        """Cancel exactly this task, queued or running; waits briefly for the engine to stop it."""
        record = await self.get(task_id, owner=owner)
        if record.state is TaskState.CANCELLED:
            return record
        if record.state.is_terminal:
            raise Conflict(f"generation {task_id} already ended as {record.state}", field="id", rule="state")
        with self._hub.subscribe(task_id) as events:
            await self._scheduler_inbox.send(Cancel(task_id=task_id))
            with anyio.move_on_after(CANCEL_WAIT_S):
                async for event in events:
                    if isinstance(event, TERMINAL_EVENTS):
                        break
        return await self.get(task_id, owner=owner)

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
