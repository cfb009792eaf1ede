"""Which textual-inversion embeddings are installed: `<name>.safetensors` files in `<data_dir>/embeddings`, each
with SDXL's two tensors, `clip_l` (the first text encoder's vectors) and `clip_g` (the second's), as A1111 and
ComfyUI save them. A prompt or negative prompt uses one by its name.

Reading a file's header only (no torch), so an API node lists them as cheaply as a worker; the engines load
the vectors themselves (engines.prompt_encoder).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import msgspec

EMBEDDING_SUFFIX = ".safetensors"
SDXL_KEYS = ("clip_l", "clip_g")
_MAX_HEADER_BYTES = 1 << 20


class EmbeddingInfo(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    path: str
    vectors: int  # tokens the embedding stands for
    shape: int  # width of one vector over both encoders (SDXL: 768 + 1280), as A1111 reports it
    # Why it cannot be used (not an SDXL embedding, unreadable); None: usable.
    problem: str | None = None


def tensor_shapes(path: Path) -> dict[str, list[int]]:
    """The shape of every tensor in a safetensors file, from its JSON header."""
    with path.open("rb") as file:
        raw = file.read(8)
        if len(raw) != 8:
            raise ValueError("not a safetensors file (shorter than its header length)")
        (length,) = struct.unpack("<Q", raw)
        if length > _MAX_HEADER_BYTES:
            raise ValueError(f"not a safetensors file (a header of {length} bytes)")
        header = json.loads(file.read(length))
    return {key: list(value["shape"]) for key, value in header.items() if key != "__metadata__"}


def describe(path: Path) -> EmbeddingInfo:
    name = path.name.removesuffix(EMBEDDING_SUFFIX)
    try:
        shapes = tensor_shapes(path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return EmbeddingInfo(name=name, path=str(path), vectors=0, shape=0, problem=f"unreadable: {exc}")
    found = [shapes.get(key) for key in SDXL_KEYS]
    if any(shape is None or len(shape) != 2 for shape in found):
        first = next(iter(shapes.values()), [0, 0])
        return EmbeddingInfo(
            name=name,
            path=str(path),
            vectors=first[0] if first else 0,
            shape=first[-1] if first else 0,
            problem="not an SDXL embedding: it needs two tensors, clip_l and clip_g, of (vectors, width)",
        )
    clip_l, clip_g = (shape for shape in found if shape is not None)
    if clip_l[0] != clip_g[0]:
        return EmbeddingInfo(
            name=name,
            path=str(path),
            vectors=clip_g[0],
            shape=clip_l[1] + clip_g[1],
            problem=f"clip_l has {clip_l[0]} vectors and clip_g {clip_g[0]}",
        )
    if any(ch.isspace() for ch in name) or not name:
        return EmbeddingInfo(
            name=name,
            path=str(path),
            vectors=clip_g[0],
            shape=clip_l[1] + clip_g[1],
            problem="a prompt names an embedding by its file name, which must not contain spaces",
        )
    return EmbeddingInfo(name=name, path=str(path), vectors=clip_g[0], shape=clip_l[1] + clip_g[1])


class EmbeddingCatalog:
    """The folder is read on every call, so a file dropped in is listed (and used) without a restart."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory

    def installed(self) -> list[EmbeddingInfo]:
        if self.directory is None or not self.directory.is_dir():
            return []
        files = sorted(self.directory.glob(f"*{EMBEDDING_SUFFIX}"))
        return [describe(path) for path in files if path.is_file()]

    def a1111_listing(self) -> dict[str, dict[str, dict[str, object]]]:
        """GET /sdapi/v1/embeddings: A1111's shape, with the files that cannot be used under `skipped`."""

        def entry(info: EmbeddingInfo) -> dict[str, object]:
            return {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": info.shape,
                    "vectors": info.vectors}  # fmt: skip

        found = self.installed()
        return {
            "loaded": {info.name: entry(info) for info in found if info.problem is None},
            "skipped": {info.name: entry(info) for info in found if info.problem is not None},
        }
