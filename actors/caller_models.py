"""Each caller's model for the AUTOMATIC1111 adapter, which A1111 clients set once with POST /options and
then leave out of every request. Kept in the store, so in a fleet every API node sees the same choice and a
restart keeps it: a SQLite table on one box, a Redis hash in a fleet. Blocking: call off the event loop."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import redis

from actors.sqlite_table import SqliteTable


class CallerModels(Protocol):
    def get(self, owner: str) -> str | None: ...

    def set(self, owner: str, model: str) -> None: ...


SCHEMA = "CREATE TABLE IF NOT EXISTS caller_models (owner TEXT PRIMARY KEY, model TEXT NOT NULL)"


class SqliteCallerModels:
    def __init__(self, database: Path) -> None:
        self._table = SqliteTable(database, SCHEMA)

    def get(self, owner: str) -> str | None:
        with self._table.connect() as connection:
            row = connection.execute("SELECT model FROM caller_models WHERE owner = ?", (owner,)).fetchone()
        return str(row[0]) if row else None

    def all(self) -> dict[str, str]:
        with self._table.connect() as connection:
            return dict(connection.execute("SELECT owner, model FROM caller_models").fetchall())

    def set(self, owner: str, model: str) -> None:
        with self._table.connect() as connection:
            connection.execute(
                "INSERT INTO caller_models (owner, model) VALUES (?, ?) "
                "ON CONFLICT (owner) DO UPDATE SET model = excluded.model",
                (owner, model),
            )


class RedisCallerModels:
    """The hash `forge:caller-models`: owner -> model id."""

    KEY = "forge:caller-models"

    def __init__(self, client: redis.Redis) -> None:
        self._client = client

    def get(self, owner: str) -> str | None:
        found = self._client.hget(self.KEY, owner)
        return found.decode() if isinstance(found, bytes) else None

    def set(self, owner: str, model: str) -> None:
        self._client.hset(self.KEY, owner, model)
