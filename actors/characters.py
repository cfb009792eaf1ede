"""The character library, kept in the store: a SQLite table on one box, Redis in a fleet (so every API node
sees the same characters). Synchronous: the server calls it from a worker thread. A character's name is
unique among its owner's; every change makes a new version."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Protocol

import msgspec
import redis

from actors.sqlite_table import SqliteTable
from forge.characters import Character

SCHEMA = """
CREATE TABLE IF NOT EXISTS characters (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    body TEXT NOT NULL,
    UNIQUE (owner, name)
);
"""
_decode = msgspec.json.Decoder(Character).decode


class NameTaken(Exception):
    pass


class CharacterStore(Protocol):
    def add(self, character: Character) -> None:
        """Raises NameTaken when the owner has a character of that name."""
        ...

    def get(self, character_id: str) -> Character | None: ...

    def find(self, owner: str, name: str) -> Character | None: ...

    def all(self, owner: str | None) -> list[Character]: ...

    def replace(self, character: Character) -> bool:
        """Store `character` (version n+1) over version n; False if it changed meanwhile or is gone. Raises
        NameTaken when the new name is another of the owner's characters'."""
        ...

    def delete(self, character_id: str) -> bool: ...


class SqliteCharacters:
    def __init__(self, database: Path) -> None:
        self._table = SqliteTable(database, SCHEMA)
        self._connect = self._table.connect

    def add(self, character: Character) -> None:
        try:
            with self._connect() as db:
                db.execute(
                    "INSERT INTO characters (id, owner, name, version, body) VALUES (?, ?, ?, ?, ?)",
                    (character.id, character.owner, character.name, character.version, msgspec.json.encode(character)),
                )
        except sqlite3.IntegrityError as exc:
            raise NameTaken(character.name) from exc

    def _one(self, where: str, args: tuple[str, ...]) -> Character | None:
        with self._connect() as db:
            row = db.execute(f"SELECT body FROM characters WHERE {where}", args).fetchone()
        return _decode(row[0]) if row else None

    def get(self, character_id: str) -> Character | None:
        return self._one("id = ?", (character_id,))

    def find(self, owner: str, name: str) -> Character | None:
        return self._one("owner = ? AND name = ?", (owner, name))

    def all(self, owner: str | None) -> list[Character]:
        with self._connect() as db:
            rows = db.execute(
                "SELECT body FROM characters WHERE ? IS NULL OR owner = ? ORDER BY name", (owner, owner)
            ).fetchall()
        return [_decode(row[0]) for row in rows]

    def replace(self, character: Character) -> bool:
        try:
            with self._connect() as db:
                done = db.execute(
                    "UPDATE characters SET name = ?, version = ?, body = ? WHERE id = ? AND version = ?",
                    (
                        character.name,
                        character.version,
                        msgspec.json.encode(character),
                        character.id,
                        character.version - 1,
                    ),
                )
                return done.rowcount == 1
        except sqlite3.IntegrityError as exc:
            raise NameTaken(character.name) from exc

    def delete(self, character_id: str) -> bool:
        with self._connect() as db:
            return db.execute("DELETE FROM characters WHERE id = ?", (character_id,)).rowcount == 1


class RedisCharacters:
    """`forge:character:<id>` holds the JSON, `forge:character-name:<owner>:<name>` the id (uniqueness),
    `forge:characters` the ids. Each change is one script, so a name is never taken twice."""

    _ADD = """
if redis.call('SET', KEYS[2], ARGV[1], 'NX') == false then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('SADD', 'forge:characters', ARGV[1])
return 1
"""
    # KEYS: the character, its old name's key, its new name's key; ARGV: id, JSON, expected old version.
    _REPLACE = """
local raw = redis.call('GET', KEYS[1])
if not raw or cjson.decode(raw)['version'] ~= tonumber(ARGV[3]) then return 0 end
if KEYS[2] ~= KEYS[3] then
  if redis.call('SET', KEYS[3], ARGV[1], 'NX') == false then return -1 end
  redis.call('DEL', KEYS[2])
end
redis.call('SET', KEYS[1], ARGV[2])
return 1
"""
    _DELETE = """
local raw = redis.call('GET', KEYS[1])
if not raw then return 0 end
local character = cjson.decode(raw)
redis.call('DEL', KEYS[1], 'forge:character-name:' .. character['owner'] .. ':' .. character['name'])
redis.call('SREM', 'forge:characters', character['id'])
return 1
"""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._add = client.register_script(self._ADD)
        self._replace = client.register_script(self._REPLACE)
        self._delete = client.register_script(self._DELETE)

    @staticmethod
    def _name_key(owner: str, name: str) -> str:
        return f"forge:character-name:{owner}:{name}"

    def add(self, character: Character) -> None:
        keys = [f"forge:character:{character.id}", self._name_key(character.owner, character.name)]
        if not self._add(keys=keys, args=[character.id, msgspec.json.encode(character)]):
            raise NameTaken(character.name)

    def get(self, character_id: str) -> Character | None:
        raw = self._client.get(f"forge:character:{character_id}")
        return _decode(raw) if raw else None  # type: ignore[arg-type]

    def find(self, owner: str, name: str) -> Character | None:
        found = self._client.get(self._name_key(owner, name))
        return self.get(found.decode()) if found else None  # type: ignore[union-attr]

    def all(self, owner: str | None) -> list[Character]:
        ids = sorted(member.decode() for member in self._client.smembers("forge:characters"))  # type: ignore[union-attr]
        raws = self._client.mget([f"forge:character:{i}" for i in ids]) if ids else []
        found = [_decode(raw) for raw in raws if raw]  # type: ignore[union-attr]
        return sorted((c for c in found if owner is None or c.owner == owner), key=lambda c: c.name)

    def replace(self, character: Character) -> bool:
        old = self.get(character.id)
        if old is None:
            return False
        keys = [
            f"forge:character:{character.id}",
            self._name_key(old.owner, old.name),
            self._name_key(character.owner, character.name),
        ]
        done = int(self._replace(keys=keys, args=[character.id, msgspec.json.encode(character), character.version - 1]))  # type: ignore[arg-type]
        if done == -1:
            raise NameTaken(character.name)
        return done == 1

    def delete(self, character_id: str) -> bool:
        return bool(self._delete(keys=[f"forge:character:{character_id}"], args=[]))
