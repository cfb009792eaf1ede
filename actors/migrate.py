"""`chara-forge store migrate --from sqlite --to redis://…`: a single box's history moves into a fleet's
Redis: every task row (those that had not ended are queued again), its result files and uploads, the API
keys, the character library and each A1111 caller's model. Safe to run again: what Redis already has is left
as it is."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

import msgspec
import redis

from actors import redis_scripts as lua
from actors.caller_models import RedisCallerModels, SqliteCallerModels
from actors.characters import NameTaken, RedisCharacters, SqliteCharacters
from actors.files import DirectoryFiles, Files, RedisFiles
from actors.keys import RedisKeys, SqliteKeys
from actors.redis_store import batch_tag
from forge.batching import batch_key
from forge.config import Config
from forge.requests import GenerationSpec

_COLUMNS = (
    "id", "seq", "owner", "idempotency_key", "request_hash", "spec", "state", "attempt", "created_at", "updated_at",
    "started_at", "finished_at", "error_code", "error_message", "images", "metadata_path",
)  # fmt: skip


@dataclass(frozen=True)
class Migrated:
    tasks: int
    requeued: int
    files: int
    keys: int
    characters: int
    # "owner/name" of each character the fleet already has another of, by that name: the fleet's is kept
    name_clashes: list[str]


def _copy_tree(source: Path, target: Files) -> int:
    copied = 0
    if source.is_dir():
        for path in sorted(source.rglob("*")):
            if path.is_file() and not path.name.startswith("."):
                target.write(path.relative_to(source).as_posix(), path.read_bytes())
                copied += 1
    return copied


def migrate(box: Config, fleet: Config, client: redis.Redis) -> Migrated:
    """Copy `box`'s SQLite store and files into the Redis store `fleet` names."""
    if not box.database_path.is_file():
        raise FileNotFoundError(f"no database at {box.database_path}")
    importer = client.register_script(lua.IMPORT)
    tasks = requeued = 0
    with sqlite3.connect(box.database_path) as db:
        rows = db.execute(f"SELECT {', '.join(_COLUMNS)} FROM tasks ORDER BY seq").fetchall()
    for row in rows:
        values = dict(zip(_COLUMNS, row, strict=True))
        spec = msgspec.json.decode(values["spec"], type=GenerationSpec)
        pairs = [item for name, value in values.items() for item in (name, "" if value is None else str(value))]
        added = importer(
            keys=[],
            args=[
                values["id"],
                values["seq"],
                values["owner"],
                values["idempotency_key"] or "",
                f"{spec.priority + 10:02d}",
                spec.model,
                spec.num_images,
                batch_tag(batch_key(spec)),
                *pairs,
                "sbk",
                batch_tag(batch_key(spec, step_level=True)),
            ],
        )
        tasks += int(added)
        requeued += int(added) and values["state"] in ("queued", "running", "postprocessing")
    cache = fleet.data_path / "fleet-cache"
    results: Files = (
        DirectoryFiles(fleet.outputs_path)
        if fleet.results_dir
        else RedisFiles(client, "results", fleet.result_ttl_s, cache / "results")
    )
    files = 0
    if not (fleet.results_dir and fleet.outputs_path.resolve() == box.outputs_path.resolve()):
        files += _copy_tree(box.outputs_path, results)
    files += _copy_tree(box.uploads_path, RedisFiles(client, "uploads", fleet.result_ttl_s, cache / "uploads"))
    redis_keys, keys = RedisKeys(client), 0
    for key in SqliteKeys(box.database_path).all():
        if redis_keys.find(key.id) is None:
            redis_keys.add(key)
            keys += 1
    characters, clashes = _copy_characters(SqliteCharacters(box.database_path), RedisCharacters(client))
    fleet_models = RedisCallerModels(client)
    for owner, model in SqliteCallerModels(box.database_path).all().items():
        if fleet_models.get(owner) is None:
            fleet_models.set(owner, model)
    return Migrated(tasks, requeued, files, keys, characters, clashes)


def _copy_characters(box: SqliteCharacters, fleet: RedisCharacters) -> tuple[int, list[str]]:
    copied, clashes = 0, []
    for character in box.all(owner=None):
        if fleet.get(character.id) is not None:
            continue
        try:
            fleet.add(character)
            copied += 1
        except NameTaken:
            clashes.append(f"{character.owner}/{character.name}")
    return copied, clashes
