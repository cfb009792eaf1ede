"""What the engine cache (`<data_dir>/engine-cache`) holds, when each part was last used, and pruning the parts
nothing has used for a while. Nothing else removes them: a torch upgrade leaves the old build's compile
cache behind, and each model or shape range its own TensorRT engines (gigabytes each).

The parts, each made and used as a whole:
- `compiled/<torch build>-<device kind>/`: inductor's and Triton's caches for one torch build and kind of
  device, with its ahead-of-time UNet packages (`aot/*.pt2`, one per UNet), which count apart;
- `tensorrt/*.plan`: one engine per network, weights, shape range and versions;
- what a stopped build left: `*.partial*` files and ONNX exports (`tensorrt/onnx/<name>/`) without an engine.

A start marks what it uses (`mark_used`), so a part's last use is the last start that read or built it."""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CacheEntry:
    path: Path
    kind: str
    size_bytes: int
    last_used: float  # seconds since the epoch


def mark_used(path: Path) -> None:
    """Now is the part's last use (its mtime). A read-only cache keeps its old times."""
    with contextlib.suppress(OSError):
        os.utime(path)


def entries(root: Path) -> list[CacheEntry]:
    """Every part under `root`, least recently used first."""
    found: list[CacheEntry] = []
    for build in _children(root / "compiled"):
        if not build.is_dir():
            continue
        aot = _children(build / "aot")
        partial = [p for p in aot if _partial(p)]
        packages = [p for p in aot if p.suffix == ".pt2" and p not in partial]
        found += [_entry(p, "aot package") for p in packages] + [_entry(p, "unfinished build") for p in partial]
        rest = _size(build) - sum(p.stat().st_size for p in packages + partial)
        last = max([build.stat().st_mtime, *(p.stat().st_mtime for p in packages)])
        found.append(CacheEntry(build, "compile cache", rest, last))
    tensorrt = _children(root / "tensorrt")
    found += [_entry(p, "tensorrt engine") for p in tensorrt if p.suffix == ".plan"]
    found += [_entry(p, "unfinished build") for p in tensorrt if _partial(p)]
    found += [_entry(p, "unfinished export") for p in _children(root / "tensorrt" / "onnx") if p.is_dir()]
    return sorted(found, key=lambda entry: entry.last_used)


def prune(root: Path, unused_for_s: float, *, dry_run: bool = False, now: float | None = None) -> list[CacheEntry]:
    """Remove the parts last used more than `unused_for_s` ago; returns them. A compile cache goes with its
    packages, and is kept while one of them is in use."""
    cutoff = (time.time() if now is None else now) - unused_for_s
    removed: list[CacheEntry] = []
    for entry in entries(root):
        if entry.last_used >= cutoff or any(entry.path.is_relative_to(gone.path) for gone in removed):
            continue
        if not dry_run:
            if entry.path.is_dir():
                shutil.rmtree(entry.path)
            else:
                entry.path.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _entry(path: Path, kind: str) -> CacheEntry:
    return CacheEntry(path, kind, _size(path), path.stat().st_mtime)


def _partial(path: Path) -> bool:
    """Written under a temporary name by a build (aot, TensorRT) that was stopped before its rename."""
    return path.is_file() and ".partial" in path.name


def _children(folder: Path) -> list[Path]:
    return sorted(folder.iterdir()) if folder.is_dir() else []


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
