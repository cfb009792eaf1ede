"""Find the weights file that broke a load, so the error names it instead of a deep stack trace."""

from __future__ import annotations

from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors",)


def weight_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file())


def damaged_file(path: Path) -> tuple[Path, str] | None:
    """The first safetensors file under `path` whose header or data does not check out, with the reason."""
    from safetensors import safe_open

    for file in weight_files(path):
        try:
            with safe_open(str(file), framework="pt") as tensors:
                for key in tensors.keys():  # noqa: SIM118 (safe_open is not iterable)
                    tensors.get_slice(key)[:1]  # touches the data range the header promises
        except Exception as exc:  # safetensors raises its own error type and OSError for short files
            return file, f"{type(exc).__name__}: {exc}"
    return None
