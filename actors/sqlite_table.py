"""A table in the server's SQLite database, used from worker threads (API keys, characters, callers' models, the
result cache's index).

Every table of one database shares one connection, one thread at a time: a connection a call, as it was, let a
burst of submissions (each remembering its result) open dozens of writers at once, which kept the store's own
connection from its writes."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class _Shared:
    connection: sqlite3.Connection
    inode: int
    lock: threading.RLock = field(default_factory=threading.RLock)
    schemas: set[str] = field(default_factory=set)  # the tables made through it


_shared: dict[Path, _Shared] = {}
_shared_lock = threading.Lock()


def _connection(database: Path) -> _Shared:
    """The shared connection to `database`, made again when the file was replaced or removed since."""
    with _shared_lock:
        known = _shared.get(database)
        inode = database.stat().st_ino if database.exists() else None
        if known is None or known.inode != inode:
            database.parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(database, timeout=30, check_same_thread=False)
            connection.execute("PRAGMA synchronous=NORMAL")  # as the store's: in WAL mode it survives a kill
            known = _shared[database] = _Shared(connection, database.stat().st_ino)
        return known


class SqliteTable:
    def __init__(self, database: Path, schema: str) -> None:
        self.database = database.absolute()
        self._schema = schema

    @contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        """The database's shared connection, to this thread alone, in a transaction committed at the end (rolled
        back on an error); the table is made on first use."""
        shared = _connection(self.database)
        with shared.lock:
            if self._schema not in shared.schemas:
                with shared.connection:
                    shared.connection.execute(self._schema)
                shared.schemas.add(self._schema)
            with shared.connection:
                yield shared.connection
