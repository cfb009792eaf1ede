"""Model files found by name in a folder (`<folder>/<name><suffix>`), read on every lookup."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


class ModelFiles:
    def __init__(self, directory: Path, suffixes: Sequence[str]) -> None:
        self.directory = directory
        self.suffixes = tuple(suffixes)

    def path(self, name: str) -> Path | None:
        for suffix in self.suffixes:
            candidate = self.directory / f"{name}{suffix}"
            if candidate.is_file():
                return candidate
        return None

    def names(self) -> list[str]:
        if not self.directory.is_dir():
            return []
        return sorted({p.stem for p in self.directory.iterdir() if p.suffix in self.suffixes and p.is_file()})

    def missing_message(self, what: str, name: str) -> str:
        choices = " or ".join(f"{name}{suffix}" for suffix in self.suffixes)
        return f"{what} {name!r} is not installed: put {choices} in {self.directory}"
