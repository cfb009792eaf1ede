"""Which finished task answered a request, by the request's fingerprint, per owner: the result cache's index.

An identical request with a fixed seed (same model weights, every parameter, the same uploaded images, which
are named by their content) makes the same images, so it can be answered by the earlier task. Two backends:
a table in the SQLite database, or Redis keys that expire with the results they point at.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import redis

from actors.sqlite_table import SqliteTable


class ResultIndex(Protocol):
    """Blocking: call off the event loop."""

    def find(self, owner: str, fingerprint: str) -> str | None: ...

    def remember(self, owner: str, fingerprint: str, task_id: str) -> None: ...


SCHEMA = (
    "CREATE TABLE IF NOT EXISTS result_cache (owner TEXT NOT NULL, fingerprint TEXT NOT NULL, "
    "task_id TEXT NOT NULL, PRIMARY KEY (owner, fingerprint))"
)


class SqliteResultIndex:
    def __init__(self, database: Path) -> None:
        self._table = SqliteTable(database, SCHEMA)

    def find(self, owner: str, fingerprint: str) -> str | None:
        with self._table.connect() as connection:
            row = connection.execute(
                "SELECT task_id FROM result_cache WHERE owner = ? AND fingerprint = ?", (owner, fingerprint)
            ).fetchone()
        return str(row[0]) if row else None

    def remember(self, owner: str, fingerprint: str, task_id: str) -> None:
        with self._table.connect() as connection:
            connection.execute(
                "INSERT INTO result_cache (owner, fingerprint, task_id) VALUES (?, ?, ?) "
                "ON CONFLICT (owner, fingerprint) DO UPDATE SET task_id = excluded.task_id",
                (owner, fingerprint, task_id),
            )


class RedisResultIndex:
    """`forge:result-cache:<owner>:<fingerprint>` holds the task id, for as long as results are kept."""

    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self._client = client
        self._ttl_s = ttl_s

    @staticmethod
    def _key(owner: str, fingerprint: str) -> str:
        return f"forge:result-cache:{owner}:{fingerprint}"

    def find(self, owner: str, fingerprint: str) -> str | None:
        found = self._client.get(self._key(owner, fingerprint))
        return found.decode() if isinstance(found, bytes) else None

    def remember(self, owner: str, fingerprint: str, task_id: str) -> None:
        self._client.set(self._key(owner, fingerprint), task_id, ex=self._ttl_s or None)
