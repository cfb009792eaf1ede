"""The Redis store (a fleet): task rows, the queue (streams with a consumer group), events, idempotency keys
and admission counters in one Redis that every API node and worker shares. Each change is one Lua script
(`actors/redis_scripts.py`), so a 202 goes out only once Redis has the whole task, and a worker presumed dead
can never overwrite a newer attempt: every write checks the attempt inside Redis.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
import msgspec
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from actors import redis_scripts as lua
from actors.disk_space import DiskSpace
from actors.rate_limits import too_many_in_flight, too_many_requests
from actors.store import Admission, IdempotencyConflict, Recovery
from forge.batching import BatchKey, batch_key
from forge.errors import ConfigError, QueueFull, StoreUnavailable
from forge.events import AnyTaskEvent, Cancelled, Progress
from forge.ids import new_id
from forge.requests import GenerationSpec
from forge.tasks import TaskRecord, TaskState

log = logging.getLogger(__name__)

P = lua.PREFIX
SOCKET_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 2.0
OUTAGE = "store unreachable"
_TASK_FIELDS = (
    "id", "seq", "owner", "spec", "state", "attempt", "created_at", "updated_at", "started_at", "finished_at",
    "error_code", "error_message", "images", "metadata_path", "idempotency_key", "worker",
)  # fmt: skip


def is_outage(exc: BaseException) -> bool:
    """Redis cannot be reached (down, restarting, a network fault): worth waiting out, never a task's fault."""
    if isinstance(exc, RedisConnectionError | RedisTimeoutError | OSError | StoreUnavailable):
        return True
    return isinstance(exc, ResponseError) and str(exc).startswith(("LOADING", "MASTERDOWN", "TRYAGAIN"))


def _redacted(url: str) -> str:
    """The URL without its password, for logs."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.rpartition('@')[2]}"


def client_options(for_asyncio: bool = True) -> dict[str, Any]:
    """Timeouts and retries for a client; the asyncio client takes its own Retry (redis-py 8 converts a
    synchronous one with a warning)."""
    retry = (AsyncRetry if for_asyncio else Retry)(ExponentialBackoff(cap=0.5, base=0.05), 2)
    return {
        "decode_responses": True,
        "socket_timeout": SOCKET_TIMEOUT_S,
        "socket_connect_timeout": CONNECT_TIMEOUT_S,
        "retry": retry,
        "health_check_interval": 10,
    }


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, list | dict):
        return msgspec.json.encode(value).decode()
    return str(value)


def _record(row: dict[str, str]) -> TaskRecord:
    def optional_float(name: str) -> float | None:
        return float(row[name]) if row.get(name) else None

    return TaskRecord(
        id=row["id"],
        seq=int(row["seq"]),
        owner=row["owner"],
        spec=msgspec.json.decode(row["spec"], type=GenerationSpec),
        state=TaskState(row["state"]),
        attempt=int(row["attempt"]),
        created_at=float(row["created_at"]),
        updated_at=float(row["updated_at"]),
        started_at=optional_float("started_at"),
        finished_at=optional_float("finished_at"),
        error_code=row.get("error_code") or None,
        error_message=row.get("error_message") or None,
        images=msgspec.json.decode(row.get("images") or "[]", type=list[str]),
        metadata_path=row.get("metadata_path") or None,
        idempotency_key=row.get("idempotency_key") or None,
        worker=row.get("worker", ""),
    )


def batch_tag(key: BatchKey | None) -> str:
    """A batch key as text for the claim script ("": the task always runs alone)."""
    return "" if key is None else msgspec.json.encode(key).decode()


class RedisStore:
    def __init__(self, client: aioredis.Redis, url: str) -> None:
        self.client = client
        self.url = url
        self.disk = DiskSpace(is_outage, OUTAGE)  # accepted work waits out an outage, then is written
        self.reachable = True
        self._scripts = {
            name: client.register_script(source)
            for name, source in (
                ("submit", lua.SUBMIT),
                ("transition", lua.TRANSITION),
                ("claim", lua.CLAIM),
                ("heartbeat", lua.HEARTBEAT),
                ("reap", lua.REAP),
                ("cancel", lua.CANCEL),
            )
        }

    @classmethod
    @asynccontextmanager
    async def open(cls, url: str) -> AsyncIterator[RedisStore]:
        client = aioredis.Redis.from_url(url, **client_options())
        try:
            yield cls(client, url)
        finally:
            with anyio.CancelScope(shield=True):
                await client.aclose()

    async def _run(self, script: str, args: Sequence[object]) -> Any:
        return await self.call(self._scripts[script], keys=[], args=[_text(arg) for arg in args])

    async def call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """A Redis call; an outage becomes StoreUnavailable (503 with Retry-After) for whoever asked."""
        try:
            return await fn(*args, **kwargs)
        except Exception as exc:
            if is_outage(exc):
                raise StoreUnavailable("the task store (Redis) is unreachable; retry shortly", retry_after_s=5) from exc
            raise

    # -- health --

    async def check(self) -> bool:
        """Ping once; `reachable` says how the last ping went (readiness)."""
        try:
            self.reachable = bool(await self.client.ping())
        except Exception as exc:
            if not is_outage(exc):
                raise
            self.reachable = False
        return self.reachable

    async def check_durability(self, required: bool) -> None:
        """Accepted work survives only with an append-only file and no eviction: warn, or refuse to start."""
        while True:
            try:
                settings = {
                    **await self.client.config_get("appendonly"),
                    **await self.client.config_get("maxmemory-policy"),
                }
                break
            except ResponseError as exc:
                if is_outage(exc):
                    await anyio.sleep(1.0)
                    continue
                log.warning("could not check Redis' persistence and eviction settings (CONFIG refused: %s)", exc)
                return
            except Exception as exc:
                if not is_outage(exc):
                    raise
                log.error("the store (Redis at %s) does not answer yet (%s); waiting for it", _redacted(self.url), exc)
                await anyio.sleep(1.0)
        problems = []
        if settings.get("appendonly") != "yes":
            problems.append("appendonly is off (a Redis restart loses accepted tasks)")
        if settings.get("maxmemory-policy", "noeviction") != "noeviction":
            problems.append(f"maxmemory-policy is {settings['maxmemory-policy']} (Redis may evict tasks)")
        if not problems:
            return
        message = "Redis can lose accepted work: " + "; ".join(problems)
        if required:
            raise ConfigError(message + " (redis_require_durable is set)", field="redis_require_durable")
        banner = "!" * 78
        log.warning(banner)
        log.warning("%s. Set appendonly yes (appendfsync always) and maxmemory-policy noeviction.", message)
        log.warning(banner)

    # -- the TaskStore interface --

    async def insert(
        self,
        *,
        owner: str,
        spec: GenerationSpec,
        admission: Admission,
        idempotency_key: str | None = None,
        request_hash: str | None = None,
    ) -> TaskRecord:
        task_id = new_id()
        plan = admission.plan
        reply = await self._run(
            "submit",
            [
                task_id,
                owner,
                idempotency_key or "",
                request_hash or "",
                msgspec.json.encode(spec).decode(),
                f"{spec.priority + 10:02d}",
                spec.model,
                spec.num_images,
                batch_tag(batch_key(spec)),
                admission.max_queue,
                plan.requests if plan else 0,
                plan.window_s if plan else 0,
                plan.max_queued if plan else 0,
                "1" if plan else "0",
                batch_tag(batch_key(spec, step_level=True)),
            ],
        )
        match reply:
            case ["ok", seq, created_at]:
                now = float(created_at)
                return TaskRecord(
                    id=task_id,
                    seq=int(seq),
                    owner=owner,
                    spec=spec,
                    state=TaskState.QUEUED,
                    attempt=1,
                    created_at=now,
                    updated_at=now,
                    idempotency_key=idempotency_key,
                )
            case ["replay", earlier]:
                hash_of_earlier = await self.call(self.client.hget, f"{P}task:{earlier}", "request_hash")
                raise IdempotencyConflict(earlier, hash_of_earlier or None)
            case ["queue_full"]:
                raise QueueFull(admission.max_queue)
            case ["rate", retry_after]:
                assert plan is not None
                raise too_many_requests(admission.plan_name, plan, float(retry_after))
            case ["busy"]:
                assert plan is not None
                raise too_many_in_flight(admission.plan_name, plan)
        raise AssertionError(f"unexpected submit reply {reply!r}")

    async def get(self, task_id: str) -> TaskRecord | None:
        row = await self.call(self.client.hgetall, f"{P}task:{task_id}")
        return _record(row) if row else None

    async def find_idempotent(self, owner: str, key: str) -> tuple[TaskRecord, str | None] | None:
        task_id = await self.call(self.client.get, f"{P}idem:{owner}:{key}")
        if task_id is None:
            return None
        row = await self.call(self.client.hgetall, f"{P}task:{task_id}")
        return (_record(row), row.get("request_hash") or None) if row else None

    async def transition(
        self,
        task_id: str,
        *,
        attempt: int,
        from_states: Iterable[TaskState],
        to: TaskState,
        event: AnyTaskEvent | None = None,
        **fields: Any,
    ) -> bool:
        if to.is_terminal:
            fields.setdefault("finished_at", time.time())
        sources = list(from_states)
        pairs = [item for name, value in fields.items() for item in (name, _text(value))]
        encoded = msgspec.json.encode(event).decode() if event is not None else ""
        args = [task_id, attempt, to.value, encoded, len(sources), *(s.value for s in sources), *pairs]

        async def write() -> bool:
            return bool(await self._scripts["transition"](keys=[], args=[_text(arg) for arg in args]))

        # Accepted work's next state must not be lost: through an outage it waits, on its actor, for Redis.
        return await self.disk.write(f"task {task_id} becoming {to}", write)

    async def count_by_state(self) -> dict[TaskState, int]:
        counts = await self.call(self.client.hgetall, f"{P}counts")
        return {TaskState(state): int(n) for state, n in counts.items() if int(n) > 0}

    async def recover(self, max_attempts: int) -> Recovery:
        """Nothing to do at start: every node's reaper re-queues the claims of workers that went silent."""
        return Recovery(requeued=[], retried=0, failed=0)

    # -- the fleet's queue --

    async def claim(
        self,
        worker: str,
        device: str,
        max_images: int,
        holds: Sequence[str],
        affinity_s: float,
        *,
        step_level: bool = False,
        joining: BatchKey | None = None,
    ) -> list[str]:
        """Take the next task (and those that can share its batch) for `device`; they are `running` now.
        `joining`: the key of the step-level batch running on `device`, which the next task joins only if it
        shares it (up to `max_images` more images)."""
        key_field = "sbk" if step_level else "bk"
        args = [worker, device, max_images, int(affinity_s * 1000), key_field, batch_tag(joining), *holds]
        return list(await self._run("claim", args))

    async def heartbeat(self, worker: str, tasks: Sequence[tuple[str, int]]) -> list[int]:
        """Keep these claims alive; per task 1 (ours), 2 (ours, cancel asked for) or 0 (lost to the reaper)."""
        args = [worker, *(item for task_id, attempt in tasks for item in (task_id, attempt))]
        return [int(x) for x in await self._run("heartbeat", args)]

    async def reap(self, claim_timeout_s: float, max_attempts: int) -> tuple[int, int]:
        """Queue again (attempt+1) every task whose claim has been silent for `claim_timeout_s`, or fail it
        `worker_lost` after `max_attempts`; returns (requeued, failed)."""
        message = f"the worker stopped during each of {max_attempts} attempts"
        requeued, failed = await self._run("reap", [int(claim_timeout_s * 1000), max_attempts, message])
        return int(requeued), int(failed)

    async def request_cancel(self, task_id: str) -> str:
        """Cancel a queued task at once, or ask the worker running it to stop: 'cancelled', 'signalled', or the
        state it already ended in."""
        event = msgspec.json.encode(Cancelled(task_id=task_id)).decode()
        return str(await self._run("cancel", [task_id, event]))

    async def position(self, task_id: str) -> int | None:
        rank = await self.call(self.client.zrank, f"{P}queued", task_id)
        return None if rank is None else int(rank)

    async def queued(self) -> int:
        return int(await self.call(self.client.zcard, f"{P}queued"))

    async def latest_progress(self, task_id: str) -> Progress | None:
        raw = await self.call(self.client.hget, f"{P}task:{task_id}", "progress")
        return msgspec.json.decode(raw, type=Progress) if raw else None

    async def placement(self, task_id: str) -> tuple[str, int, str]:
        device, batch, worker = await self.call(self.client.hmget, f"{P}task:{task_id}", "device", "batch", "worker")
        return device or "", int(batch or 0), worker or ""

    async def list(
        self,
        *,
        owner: str | None = None,
        state: TaskState | None = None,
        limit: int = 20,
        before_seq: int | None = None,
        before_id: str | None = None,
    ) -> list[TaskRecord]:
        index = f"{P}owner:{owner}" if owner is not None else f"{P}tasks"
        if before_id is not None:
            seq = await self.call(self.client.hget, f"{P}task:{before_id}", "seq")
            if seq is None:
                return []
            before_seq = int(seq)
        top = f"({before_seq}" if before_seq is not None else "+inf"
        found: list[TaskRecord] = []
        chunk = limit if state is None else max(limit * 4, 50)
        while len(found) < limit:
            ids = await self.call(self.client.zrevrangebyscore, index, top, "-inf", 0, chunk, True)
            if not ids:
                break
            async with self.client.pipeline(transaction=False) as pipe:
                for task_id, _ in ids:
                    pipe.hgetall(f"{P}task:{task_id}")
                rows = await self.call(pipe.execute)
            for row in rows:
                if row and (state is None or row["state"] == state.value):
                    found.append(_record(row))
            top = f"({int(ids[-1][1])}"
            if len(ids) < chunk:
                break
        return found[:limit]
