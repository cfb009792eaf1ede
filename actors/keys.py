"""API keys, kept hashed in the server's SQLite database. Synchronous (sqlite3): the CLI uses it
directly, the server from a worker thread. A key is shown once, when it is made."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
import time
from pathlib import Path
from typing import Annotated

import msgspec
from msgspec import Meta

SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    secret_hash TEXT NOT NULL,
    owner TEXT NOT NULL,
    plan TEXT NOT NULL,
    scopes TEXT NOT NULL,
    created_at REAL NOT NULL,
    revoked_at REAL
);
"""
PREFIX = "cf_"


class ApiKey(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    owner: str
    plan: str
    scopes: list[str]
    created_at: float
    revoked_at: float | None = None


class KeyRecord(ApiKey, frozen=True, kw_only=True):
    """A key as stored, for copying keys to another server: the secret's hash, never the secret."""

    secret_hash: Annotated[str, Meta(pattern="^[0-9a-f]{64}$")]


class KeyExport(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    keys: list[KeyRecord]


def _hash(secret: str) -> str:
    # Keys are 256 random bits, so one SHA-256 is enough; a slow password hash buys nothing here.
    return hashlib.sha256(secret.encode()).hexdigest()


class KeyStore:
    def __init__(self, database: Path) -> None:
        self.database = database
        self._schema_ready = False

    def _connect(self) -> sqlite3.Connection:
        """A connection per call (calls come from worker threads); the table is made on the first one."""
        if not self._schema_ready:
            self.database.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(self.database, timeout=10)
        if not self._schema_ready:
            connection.execute(SCHEMA)
            self._schema_ready = True
        return connection

    def create(self, owner: str, plan: str, scopes: list[str]) -> tuple[ApiKey, str]:
        key_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
        key = ApiKey(id=key_id, owner=owner, plan=plan, scopes=sorted(set(scopes)), created_at=time.time())
        with self._connect() as db:
            db.execute(
                "INSERT INTO api_keys (id, secret_hash, owner, plan, scopes, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                (key.id, _hash(secret), owner, plan, " ".join(key.scopes), key.created_at),
            )
        return key, f"{PREFIX}{key_id}_{secret}"

    def list(self) -> list[ApiKey]:
        return list(self.export().keys)

    def export(self) -> KeyExport:
        with self._connect() as db:
            rows = db.execute(
                "SELECT id, owner, plan, scopes, created_at, revoked_at, secret_hash FROM api_keys ORDER BY created_at"
            ).fetchall()
        return KeyExport(
            keys=[
                KeyRecord(
                    id=r[0],
                    owner=r[1],
                    plan=r[2],
                    scopes=r[3].split(),
                    created_at=r[4],
                    revoked_at=r[5],
                    secret_hash=r[6],
                )
                for r in rows
            ]
        )

    def import_keys(self, exported: KeyExport) -> tuple[int, int]:
        """Add the keys this store lacks and take over revocations (a revoked key stays revoked); returns
        (added, revoked). A key id that exists here with another secret is refused, and nothing changes."""
        added = revoked = 0
        with self._connect() as db:
            for key in exported.keys:
                row = db.execute("SELECT secret_hash, revoked_at FROM api_keys WHERE id = ?", (key.id,)).fetchone()
                if row is None:
                    db.execute(
                        "INSERT INTO api_keys (id, secret_hash, owner, plan, scopes, created_at, revoked_at) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (
                            key.id,
                            key.secret_hash,
                            key.owner,
                            key.plan,
                            " ".join(key.scopes),
                            key.created_at,
                            key.revoked_at,
                        ),
                    )
                    added += 1
                elif not hmac.compare_digest(row[0], key.secret_hash):
                    raise ValueError(f"key {key.id} exists here with another secret")
                elif key.revoked_at is not None and row[1] is None:
                    db.execute("UPDATE api_keys SET revoked_at = ? WHERE id = ?", (key.revoked_at, key.id))
                    revoked += 1
        return added, revoked

    def revoke(self, key_id: str) -> bool:
        with self._connect() as db:
            done = db.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (time.time(), key_id)
            )
            return done.rowcount == 1

    def verify(self, token: str) -> ApiKey | None:
        """The key a token stands for, if it exists, matches and is not revoked."""
        if not token.startswith(PREFIX):
            return None
        key_id, _, secret = token[len(PREFIX) :].partition("_")
        with self._connect() as db:
            row = db.execute(
                "SELECT secret_hash, owner, plan, scopes, created_at, revoked_at FROM api_keys WHERE id = ?", (key_id,)
            ).fetchone()
        if row is None or row[5] is not None or not hmac.compare_digest(row[0], _hash(secret)):
            return None
        return ApiKey(id=key_id, owner=row[1], plan=row[2], scopes=row[3].split(), created_at=row[4])
