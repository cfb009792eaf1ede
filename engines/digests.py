"""sha256 of model weights without reading gigabytes at every start.

A file's hash is remembered under a cache folder (not beside the weights, which may be read-only), keyed
by its resolved path and stamped with its size and mtime, so a replaced file is hashed again. Files of a
Hugging Face snapshot need no hashing at all: each links to a blob named by its content's sha256.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from pathlib import Path

from engines.weights import weight_files

_SHA256_NAME = re.compile(r"[0-9a-f]{64}")


def weights_digest(path: Path, memo_dir: Path) -> str:
    """One sha256 over the weight files under `path` (a folder or a single file), by name and content."""
    digest = hashlib.sha256()
    for file in weight_files(path):
        digest.update(f"{file.name}:{file_sha256(file, memo_dir)}\n".encode())
    return digest.hexdigest()


def file_sha256(file: Path, memo_dir: Path) -> str:
    target = file.resolve()
    if target.parent.name == "blobs" and _SHA256_NAME.fullmatch(target.name):
        return target.name  # the hub stores large files under their content's sha256
    stat = target.stat()
    stamp = f"{stat.st_size}:{stat.st_mtime_ns}"
    memo = memo_dir / hashlib.sha256(str(target).encode()).hexdigest()[:32]
    with contextlib.suppress(OSError):
        remembered = memo.read_text()
        if remembered.startswith(stamp + " "):
            return remembered.removeprefix(stamp + " ")
    file_hash = _read_sha256(target)
    with contextlib.suppress(OSError):  # a read-only cache only costs the hashing again next time
        memo_dir.mkdir(parents=True, exist_ok=True)
        memo.write_text(f"{stamp} {file_hash}")
    return file_hash


def _read_sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as stream:
        while chunk := stream.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()
