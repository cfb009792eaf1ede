"""Where result images, sprite sheets, metadata and uploads are kept: a directory (one box, or a directory
every node of a fleet mounts), or Redis with a retention (a fleet without shared storage). Synchronous: call
from a worker thread, never on the event loop."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Protocol

import redis

from actors.encoding import write_atomically


class Files(Protocol):
    def write(self, name: str, data: bytes) -> None: ...

    def read(self, name: str) -> bytes | None: ...

    def remove(self, names: list[str]) -> None: ...

    def local_path(self, name: str) -> Path | None:
        """A file on this machine with the content (for libraries that want a path), or None if absent."""
        ...


def _safe(name: str) -> bool:
    return bool(name) and not name.startswith("/") and ".." not in Path(name).parts


class DirectoryFiles:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, name: str) -> Path | None:
        if not _safe(name):
            return None
        root = self.root.resolve()
        path = (root / name).resolve()
        return path if path.is_relative_to(root) else None

    def write(self, name: str, data: bytes) -> None:
        path = self._path(name)
        assert path is not None, name
        write_atomically(path, data)

    def read(self, name: str) -> bytes | None:
        path = self.local_path(name)
        return path.read_bytes() if path is not None else None

    def local_path(self, name: str) -> Path | None:
        path = self._path(name)
        return path if path is not None and path.is_file() else None

    def remove(self, names: list[str]) -> None:
        for name in names:
            if (path := self._path(name)) is not None:
                path.unlink(missing_ok=True)
                if path.parent != self.root.resolve() and not any(path.parent.iterdir()):
                    shutil.rmtree(path.parent, ignore_errors=True)


class RedisFiles:
    """Each file one Redis string under `forge:file:<namespace>/<name>`, expiring after `ttl_s` (0: never).
    `local_path` keeps a copy in `cache` for libraries that read paths (the web UI, control images)."""

    def __init__(self, client: redis.Redis, namespace: str, ttl_s: int, cache: Path) -> None:
        self._client = client
        self._namespace = namespace
        self._ttl = ttl_s or None
        self._cache = DirectoryFiles(cache)

    def _key(self, name: str) -> str:
        return f"forge:file:{self._namespace}/{name}"

    def write(self, name: str, data: bytes) -> None:
        assert _safe(name), name
        self._client.set(self._key(name), data, ex=self._ttl)

    def read(self, name: str) -> bytes | None:
        if not _safe(name):
            return None
        data = self._client.get(self._key(name))
        return bytes(data) if data is not None else None  # type: ignore[arg-type]

    def local_path(self, name: str) -> Path | None:
        cached = self._cache.local_path(name)
        if cached is not None:
            return cached
        data = self.read(name)
        if data is None:
            return None
        self._cache.write(name, data)
        return self._cache.local_path(name)

    def remove(self, names: list[str]) -> None:
        if names:
            self._client.delete(*(self._key(name) for name in names if _safe(name)))
        self._cache.remove(names)
