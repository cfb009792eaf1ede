"""Opens what `store` (FORGE_STORE) names: task rows, files, uploads and keys in SQLite and directories under
`data_dir` (one box), or all of them in one Redis (a fleet; files in `results_dir` instead when it is set)."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from actors.caller_models import CallerModels, RedisCallerModels, SqliteCallerModels
from actors.characters import CharacterStore, RedisCharacters, SqliteCharacters
from actors.files import DirectoryFiles, Files, RedisFiles
from actors.keys import KeyStore, RedisKeys, SqliteKeys
from actors.redis_store import RedisStore
from actors.result_index import RedisResultIndex, ResultIndex, SqliteResultIndex
from actors.sqlite_store import SqliteStore
from actors.store import TaskStore
from actors.sync_redis import sync_redis
from forge.config import Config


@dataclass(frozen=True)
class Backends:
    store: TaskStore
    results: Files
    uploads: Files
    keys: KeyStore
    characters: CharacterStore
    result_index: ResultIndex
    caller_models: CallerModels
    redis: RedisStore | None = None  # the fleet's store, when it is Redis


def node_name(config: Config) -> str:
    return config.node_name or f"{socket.gethostname()}-{os.getpid()}"


def key_store(config: Config) -> KeyStore:
    """The API keys (for the CLI as for the server)."""
    if config.uses_redis:
        return KeyStore(RedisKeys(sync_redis(config.store)))
    return KeyStore(SqliteKeys(config.database_path))


@asynccontextmanager
async def open_backends(config: Config) -> AsyncIterator[Backends]:
    if not config.uses_redis:
        async with SqliteStore.open(config.database_path) as store:
            yield Backends(
                store=store,
                results=DirectoryFiles(config.outputs_path),
                uploads=DirectoryFiles(config.uploads_path),
                keys=key_store(config),
                characters=SqliteCharacters(config.database_path),
                result_index=SqliteResultIndex(config.database_path),
                caller_models=SqliteCallerModels(config.database_path),
            )
        return
    blobs = sync_redis(config.store)
    cache = config.data_path / "fleet-cache"
    results: Files = (
        DirectoryFiles(config.outputs_path)
        if config.results_dir
        else RedisFiles(blobs, "results", config.result_ttl_s, cache / "results")
    )
    try:
        async with RedisStore.open(config.store) as store:
            await store.check_durability(config.redis_require_durable)
            yield Backends(
                store=store,
                results=results,
                uploads=RedisFiles(blobs, "uploads", config.result_ttl_s, cache / "uploads"),
                keys=KeyStore(RedisKeys(blobs)),
                characters=RedisCharacters(blobs),
                result_index=RedisResultIndex(blobs, config.result_ttl_s),
                caller_models=RedisCallerModels(blobs),
                redis=store,
            )
    finally:
        blobs.close()
