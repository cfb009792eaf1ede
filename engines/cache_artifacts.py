"""Moving compiled code between machines: one file holds the compile caches for every torch build, Triton and
GPU kind this machine compiled for (`compiled/<key>/`: inductor's and Triton's caches, and torch's portable
cache artifacts). A fleet compiles once, exports, and every worker imports before its first start; a worker
whose torch, Triton and GPU match a key starts warm, the others compile as usual. The artifacts alone hold no
compiled C++ (CPU) code, so the whole folder travels."""

from __future__ import annotations

import tarfile
from pathlib import Path

from engines.compiled import ARTIFACTS
from forge.errors import ConfigError


def export_cache(engine_cache: Path, target: Path) -> list[str]:
    """Write the compile caches under `engine_cache` to `target` (a gzipped tar file); the keys written."""
    found = sorted(path.parent for path in (engine_cache / "compiled").glob(f"*/{ARTIFACTS}"))
    if not found:
        raise ConfigError(f"nothing to export: no compiled engine has started with {engine_cache}", field="data_dir")
    partial = target.with_name(target.name + ".partial")
    with tarfile.open(partial, "w:gz", compresslevel=1) as archive:
        for folder in found:
            archive.add(folder, arcname=folder.name, filter=_without_partials)
    partial.replace(target)
    return [folder.name for folder in found]


def _without_partials(member: tarfile.TarInfo) -> tarfile.TarInfo | None:
    return None if ".partial" in member.name or member.name.endswith(".lock") else member


def import_cache(source: Path, engine_cache: Path) -> list[str]:
    """Place the caches `source` holds under `engine_cache`, over older ones of the same keys; the keys."""
    target = engine_cache / "compiled"
    try:
        with tarfile.open(source) as archive:
            members = archive.getmembers()
            for member in members:
                if not (member.isfile() or member.isdir()) or member.name.startswith(("/", ".")) or ".." in member.name:
                    raise ConfigError(f"unexpected entry {member.name!r} in an exported engine cache", field="file")
            keys = sorted({member.name.split("/")[0] for member in members})
            if not all((Path(key) / ARTIFACTS).as_posix() in archive.getnames() for key in keys):
                raise ConfigError(f"{source} holds no {ARTIFACTS} for one of its folders", field="file")
            target.mkdir(parents=True, exist_ok=True)
            archive.extractall(target, filter="data")
    except (OSError, tarfile.TarError) as exc:
        raise ConfigError(f"{source} is not an exported engine cache: {exc}", field="file") from exc
    return keys
