"""The SQLite store (one box): task rows in SQLite (WAL), the single source of truth for every task's state.
The queue's order is kept in memory by the scheduler and rebuilt from the `queued` rows at start."""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite
import anyio
import msgspec

from actors.disk_space import DiskSpace, StorageFull, is_disk_full
from actors.rate_limits import RateLimiter
from actors.store import WORKER_LOST, Admission, IdempotencyConflict, Recovery
from forge.errors import QueueFull
from forge.events import AnyTaskEvent
from forge.ids import new_id
from forge.requests import GenerationSpec
from forge.tasks import ACTIVE_STATES, TaskRecord, TaskState

log = logging.getLogger(__name__)
T = TypeVar("T")
FIRST_LOCKED_RETRY_S, MOST_LOCKED_RETRY_S = 0.02, 1.0
SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    owner TEXT NOT NULL,
    idempotency_key TEXT,
    request_hash TEXT,
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    error_code TEXT,
    error_message TEXT,
    images TEXT NOT NULL DEFAULT '[]',
    metadata_path TEXT,
    UNIQUE (owner, idempotency_key)
);
CREATE INDEX IF NOT EXISTS tasks_by_state ON tasks (state, seq);
CREATE INDEX IF NOT EXISTS tasks_by_owner ON tasks (owner, seq);
CREATE INDEX IF NOT EXISTS tasks_by_owner_state ON tasks (owner, state);
"""
_COLUMNS = (
    "id, seq, owner, spec, state, attempt, created_at, updated_at, started_at, finished_at, "
    "error_code, error_message, images, metadata_path, idempotency_key"
)
_UPDATABLE = {"started_at", "finished_at", "error_code", "error_message", "images", "metadata_path"}


def _record(row: aiosqlite.Row) -> TaskRecord:
    return TaskRecord(
        id=row[0],
        seq=row[1],
        owner=row[2],
        spec=msgspec.json.decode(row[3], type=GenerationSpec),
        state=TaskState(row[4]),
        attempt=row[5],
        created_at=row[6],
        updated_at=row[7],
        started_at=row[8],
        finished_at=row[9],
        error_code=row[10],
        error_message=row[11],
        images=msgspec.json.decode(row[12], type=list[str]),
        metadata_path=row[13],
        idempotency_key=row[14],
    )


def is_locked(exc: BaseException) -> bool:
    """Another connection holds the write lock (or wrote after this one's read began): worth trying again."""
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF  # the primary code of an extended one (BUSY_SNAPSHOT...)
    return isinstance(exc, sqlite3.OperationalError) and code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


async def when_unlocked(what: str, attempt: Callable[[], Awaitable[T]]) -> T:
    """`attempt()`, tried again with growing pauses for as long as the database is locked: a locked database
    is transient, and a write of accepted work must neither fail nor end the server."""
    delay = FIRST_LOCKED_RETRY_S
    while True:
        try:
            return await attempt()
        except sqlite3.OperationalError as exc:
            if not is_locked(exc):
                raise
            log.warning("the database is locked: %s tried again in %.2f s", what, delay)
            await anyio.sleep(delay)
            delay = min(delay * 2, MOST_LOCKED_RETRY_S)


class SqliteStore:
    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db
        self.disk = DiskSpace()  # transitions wait out a full disk; inserts are refused
        self._admission = anyio.Lock()
        self._limiter: RateLimiter | None = None  # per-plan submission windows, in this process's memory

    @classmethod
    @asynccontextmanager
    async def open(cls, path: Path) -> AsyncIterator[SqliteStore]:
        path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: every statement commits on its own unless wrapped in BEGIN ... COMMIT.
        db = await aiosqlite.connect(path, isolation_level=None)
        try:
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=NORMAL")  # in WAL mode: survives a killed process
            await db.execute("PRAGMA busy_timeout=5000")
            await db.executescript(SCHEMA)
            await db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            yield cls(db)
        finally:
            with anyio.CancelScope(shield=True):  # even on a forced stop: let the SQLite thread finish
                await db.close()

    async def insert(
        self,
        *,
        owner: str,
        spec: GenerationSpec,
        admission: Admission,
        idempotency_key: str | None = None,
        request_hash: str | None = None,
    ) -> TaskRecord:
        # Counting and inserting under one lock: concurrent submissions cannot both take the last place.
        async with self._admission:
            if idempotency_key is not None and (earlier := await self.find_idempotent(owner, idempotency_key)):
                raise IdempotencyConflict(earlier[0].id, earlier[1])
            await self._admit(owner, admission)
            return await self._insert(owner, spec, idempotency_key, request_hash)

    async def _admit(self, owner: str, admission: Admission) -> None:
        if await self.count([TaskState.QUEUED]) >= admission.max_queue:
            raise QueueFull(admission.max_queue)
        if admission.plan is not None:
            if self._limiter is None:
                self._limiter = RateLimiter()
            in_flight = await self.count([TaskState.QUEUED, *ACTIVE_STATES], owner=owner)
            self._limiter.admit(owner, admission.plan_name, admission.plan, in_flight)

    async def _insert(
        self, owner: str, spec: GenerationSpec, idempotency_key: str | None, request_hash: str | None
    ) -> TaskRecord:
        now = time.time()
        task_id = new_id()
        try:
            await when_unlocked(
                f"task {task_id}",
                lambda: self._db.execute(
                    "INSERT INTO tasks (id, owner, idempotency_key, request_hash, spec, state, attempt, created_at, "
                    "updated_at) VALUES (?, ?, ?, ?, ?, ?, 1, ?, ?)",
                    (
                        task_id,
                        owner,
                        idempotency_key,
                        request_hash,
                        msgspec.json.encode(spec).decode(),
                        TaskState.QUEUED,
                        now,
                        now,
                    ),
                ),
            )
        except sqlite3.OperationalError as exc:
            if is_disk_full(exc):
                raise StorageFull() from exc
            raise
        record = await self.get(task_id)
        assert record is not None
        return record

    async def _rows(self, sql: str, parameters: Iterable[Any]) -> list[Any]:
        """A query's rows, read in one step on the connection's thread: a cursor left open across an await would
        keep a read transaction open, and a write on this connection after another connection's commit then
        fails at once with "database is locked" (SQLITE_BUSY_SNAPSHOT), whatever the busy timeout."""
        return list(await self._db.execute_fetchall(sql, tuple(parameters)))

    async def get(self, task_id: str) -> TaskRecord | None:
        rows = await self._rows(f"SELECT {_COLUMNS} FROM tasks WHERE id = ?", (task_id,))
        return _record(rows[0]) if rows else None

    async def find_idempotent(self, owner: str, key: str) -> tuple[TaskRecord, str | None] | None:
        rows = await self._rows(
            f"SELECT {_COLUMNS}, request_hash FROM tasks WHERE owner = ? AND idempotency_key = ?", (owner, key)
        )
        return (_record(rows[0]), rows[0][15]) if rows else None

    async def count(self, states: Iterable[TaskState], *, owner: str | None = None) -> int:
        """How many tasks (of `owner`, or of everyone) are in one of `states`."""
        wanted = list(states)
        condition = f"state IN ({', '.join('?' * len(wanted))})"
        parameters: list[str] = list(wanted)
        if owner is not None:
            condition += " AND owner = ?"
            parameters.append(owner)
        rows = await self._rows(f"SELECT COUNT(*) FROM tasks WHERE {condition}", parameters)
        return int(rows[0][0]) if rows else 0

    async def transition(
        self,
        task_id: str,
        *,
        attempt: int,
        from_states: Iterable[TaskState],
        to: TaskState,
        event: AnyTaskEvent | None = None,  # events go to the process's hub; SQLite keeps none
        **fields: Any,
    ) -> bool:
        unknown = set(fields) - _UPDATABLE
        if unknown:
            raise ValueError(f"not updatable: {sorted(unknown)}")
        if "images" in fields:
            fields["images"] = msgspec.json.encode(fields["images"]).decode()
        now = time.time()
        if to.is_terminal:
            fields.setdefault("finished_at", now)
        sources = list(from_states)
        assignments = "".join(f", {name} = ?" for name in fields)

        async def update() -> aiosqlite.Cursor:
            return await self._db.execute(
                f"UPDATE tasks SET state = ?, updated_at = ?{assignments} WHERE id = ? AND attempt = ? "
                f"AND state IN ({', '.join('?' * len(sources))})",
                (to, now, *fields.values(), task_id, attempt, *sources),
            )

        # An accepted task's next state must not be lost: on a full disk it waits, on its actor, for space, and
        # while another connection holds the write lock it is tried again.
        what = f"task {task_id} becoming {to}"
        cursor = await self.disk.write(what, lambda: when_unlocked(what, update))
        return cursor.rowcount == 1

    async def list(
        self,
        *,
        owner: str | None = None,
        state: TaskState | None = None,
        limit: int = 20,
        before_seq: int | None = None,
        before_id: str | None = None,
    ) -> list[TaskRecord]:
        clauses, args = [], []
        for clause, value in (
            ("owner = ?", owner),
            ("state = ?", state),
            ("seq < ?", before_seq),
            ("seq < (SELECT seq FROM tasks WHERE id = ?)", before_id),
        ):
            if value is not None:
                clauses.append(clause)
                args.append(value)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = await self._rows(f"SELECT {_COLUMNS} FROM tasks {where} ORDER BY seq DESC LIMIT ?", (*args, limit))
        return [_record(row) for row in rows]

    async def count_by_state(self) -> dict[TaskState, int]:
        rows = await self._rows("SELECT state, COUNT(*) FROM tasks GROUP BY state", ())
        return {TaskState(state): count for state, count in rows}

    async def recover(self, max_attempts: int) -> Recovery:
        what = "the recovery of interrupted tasks"
        return await self.disk.write(what, lambda: when_unlocked(what, lambda: self._recover(max_attempts)))

    async def _recover(self, max_attempts: int) -> Recovery:
        active = [state.value for state in ACTIVE_STATES]
        marks = ", ".join("?" * len(active))
        now = time.time()
        await self._db.execute("BEGIN IMMEDIATE")
        try:
            failed = await self._db.execute(
                f"UPDATE tasks SET state = ?, error_code = ?, error_message = ?, finished_at = ?, updated_at = ? "
                f"WHERE state IN ({marks}) AND attempt >= ?",
                (
                    TaskState.FAILED,
                    WORKER_LOST,
                    f"the worker stopped during each of {max_attempts} attempts",
                    now,
                    now,
                    *active,
                    max_attempts,
                ),
            )
            retried = await self._db.execute(
                f"UPDATE tasks SET state = ?, attempt = attempt + 1, started_at = NULL, updated_at = ? "
                f"WHERE state IN ({marks})",
                (TaskState.QUEUED, now, *active),
            )
            await self._db.execute("COMMIT")
        except BaseException:
            await self._db.execute("ROLLBACK")
            raise
        rows = await self._rows(f"SELECT {_COLUMNS} FROM tasks WHERE state = ? ORDER BY seq", (TaskState.QUEUED,))
        queued = [_record(row) for row in rows]
        return Recovery(requeued=queued, retried=retried.rowcount, failed=failed.rowcount)
