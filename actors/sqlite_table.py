"""A table in the server's SQLite database, used from worker threads (API keys, characters)."""

from __future__ import annotations

import sqlite3
from pathlib import Path


class SqliteTable:
    def __init__(self, database: Path, schema: str) -> None:
        self.database = database
        self._schema = schema
        self._schema_ready = False

    def connect(self) -> sqlite3.Connection:
        """A connection per call (calls come from worker threads); the table is made on the first one."""
        if not self._schema_ready:
            self.database.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(self.database, timeout=10)
        if not self._schema_ready:
            connection.execute(self._schema)
            self._schema_ready = True
        return connection
