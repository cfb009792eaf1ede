"""API keys, kept hashed in the store: SQLite on one box, Redis for a fleet (so a key made once works on every
node). Synchronous: the CLI uses it directly, the server from a worker thread. A key is shown once, when it
is made."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from pathlib import Path
from typing import ParamSpec, Protocol, TypeVar

import msgspec
import redis

from actors.sqlite_table import SqliteTable

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
P = ParamSpec("P")
T = TypeVar("T")


class ApiKey(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    owner: str
    plan: str
    scopes: list[str]
    created_at: float
    revoked_at: float | None = None


class StoredKey(ApiKey, frozen=True, kw_only=True):
    """A key as stored: with its secret's hash, never the secret."""

    secret_hash: str


def _hash(secret: str) -> str:
    # Keys are 256 random bits, so one SHA-256 is enough; a slow password hash buys nothing here.
    return hashlib.sha256(secret.encode()).hexdigest()


class KeyBackend(Protocol):
    def add(self, key: StoredKey) -> None: ...

    def find(self, key_id: str) -> StoredKey | None: ...

    def all(self) -> list[StoredKey]: ...

    def mark_revoked(self, key_id: str, at: float) -> bool: ...


class KeyStore:
    def __init__(self, backend: KeyBackend) -> None:
        self.backend = backend

    def create(self, owner: str, plan: str, scopes: list[str]) -> tuple[ApiKey, str]:
        key_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
        stored = StoredKey(
            id=key_id,
            owner=owner,
            plan=plan,
            scopes=sorted(set(scopes)),
            created_at=time.time(),
            secret_hash=_hash(secret),
        )
        self.backend.add(stored)
        return _public(stored), f"{PREFIX}{key_id}_{secret}"

    def list(self) -> list[ApiKey]:
        return [_public(key) for key in sorted(self.backend.all(), key=lambda key: key.created_at)]

    def revoke(self, key_id: str) -> bool:
        return self.backend.mark_revoked(key_id, time.time())

    def verify(self, token: str) -> ApiKey | None:
        """The key a token stands for, if it exists, matches and is not revoked."""
        if not token.startswith(PREFIX):
            return None
        key_id, _, secret = token[len(PREFIX) :].partition("_")
        stored = self.backend.find(key_id)
        if (
            stored is None
            or stored.revoked_at is not None
            or not hmac.compare_digest(stored.secret_hash, _hash(secret))
        ):
            return None
        return _public(stored)


def _public(key: StoredKey) -> ApiKey:
    return ApiKey(
        id=key.id,
        owner=key.owner,
        plan=key.plan,
        scopes=key.scopes,
        created_at=key.created_at,
        revoked_at=key.revoked_at,
    )


class SqliteKeys:
    def __init__(self, database: Path) -> None:
        self._table = SqliteTable(database, SCHEMA)
        self._connect = self._table.connect

    def add(self, key: StoredKey) -> None:
        with self._connect() as db:
            db.execute(
                "INSERT INTO api_keys (id, secret_hash, owner, plan, scopes, created_at, revoked_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (key.id, key.secret_hash, key.owner, key.plan, " ".join(key.scopes), key.created_at, key.revoked_at),
            )

    def _rows(self, where: str = "", args: tuple[str, ...] = ()) -> list[StoredKey]:
        with self._connect() as db:
            rows = db.execute(
                f"SELECT id, owner, plan, scopes, created_at, revoked_at, secret_hash FROM api_keys {where}", args
            ).fetchall()
        return [
            StoredKey(
                id=r[0], owner=r[1], plan=r[2], scopes=r[3].split(), created_at=r[4], revoked_at=r[5], secret_hash=r[6]
            )
            for r in rows
        ]

    def find(self, key_id: str) -> StoredKey | None:
        found = self._rows("WHERE id = ?", (key_id,))
        return found[0] if found else None

    def all(self) -> list[StoredKey]:
        return self._rows()

    def mark_revoked(self, key_id: str, at: float) -> bool:
        with self._connect() as db:
            done = db.execute("UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (at, key_id))
            return done.rowcount == 1


class RedisKeys:
    """Each key a JSON string under `forge:key:<id>`, listed in the set `forge:keys`."""

    _REVOKE = """
local raw = redis.call('GET', KEYS[1])
if not raw then return 0 end
local key = cjson.decode(raw)
if key['revoked_at'] ~= nil and key['revoked_at'] ~= cjson.null then return 0 end
key['revoked_at'] = tonumber(ARGV[1])
redis.call('SET', KEYS[1], cjson.encode(key))
return 1
"""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._revoke = client.register_script(self._REVOKE)

    def add(self, key: StoredKey) -> None:
        with self._client.pipeline() as pipe:
            pipe.set(f"forge:key:{key.id}", msgspec.json.encode(key), nx=True)
            pipe.sadd("forge:keys", key.id)
            pipe.execute()

    def find(self, key_id: str) -> StoredKey | None:
        raw = self._client.get(f"forge:key:{key_id}")
        return msgspec.json.decode(raw, type=StoredKey) if raw else None  # type: ignore[arg-type]

    def all(self) -> list[StoredKey]:
        ids = sorted(member.decode() for member in self._client.smembers("forge:keys"))  # type: ignore[union-attr]
        raws = self._client.mget([f"forge:key:{key_id}" for key_id in ids]) if ids else []
        return [msgspec.json.decode(raw, type=StoredKey) for raw in raws if raw]  # type: ignore[union-attr]

    def mark_revoked(self, key_id: str, at: float) -> bool:
        return bool(self._revoke(keys=[f"forge:key:{key_id}"], args=[at]))
