"""Which LoRAs are installed: `<name>.safetensors` files (or `<name>/` folders) in the LoRA folder.

The folder is read on every lookup, so a LoRA dropped in while the server runs is usable at once.
A style's LoRA may also name a hub repo; it is used from the Hugging Face cache once fetched.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import msgspec

from forge.hub_fetch import fetch_bounded, hub_offline

LORA_SUFFIX = ".safetensors"
DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"


class LoraInfo(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    path: str
    size_bytes: int
    source: str  # "file" or "hub"


class HubLora(msgspec.Struct, frozen=True, kw_only=True):
    repo: str
    weight_name: str | None = None


def _cached_hub_file(source: HubLora, cache_dir: Path | None) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(source.repo, source.weight_name or DIFFUSERS_LORA_FILE, cache_dir=cache_dir)
    return Path(found) if isinstance(found, str) else None


class LoraCatalog:
    def __init__(
        self, directory: Path, hub_sources: dict[str, HubLora] | None = None, hub_cache: Path | None = None
    ) -> None:
        self.directory = directory
        self.hub_sources = hub_sources or {}
        self.hub_cache = hub_cache  # None: the Hugging Face default cache

    def expected_file(self, name: str) -> Path:
        return self.directory / f"{name}{LORA_SUFFIX}"

    def path(self, name: str) -> Path | None:
        file = self.expected_file(name)
        if file.is_file():
            return file
        folder = self.directory / name
        if folder.is_dir():
            weights = folder / DIFFUSERS_LORA_FILE
            if weights.is_file():
                return weights
            found = sorted(folder.glob(f"*{LORA_SUFFIX}"))
            if len(found) == 1:
                return found[0]
        source = self.hub_sources.get(name)
        return _cached_hub_file(source, self.hub_cache) if source is not None else None

    def missing_message(self, name: str) -> str:
        message = f"LoRA {name!r} is not installed: put {self.expected_file(name)} in place"
        source = self.hub_sources.get(name)
        if source is not None:
            message += f" (or let the server fetch it from the hub repo {source.repo} at start)"
        return message

    def installed(self) -> list[LoraInfo]:
        names: set[str] = set()
        if self.directory.is_dir():
            for entry in self.directory.iterdir():
                if entry.suffix == LORA_SUFFIX and entry.is_file():
                    names.add(entry.stem)
                elif entry.is_dir():
                    names.add(entry.name)
        names.update(self.hub_sources)
        found = []
        for name in sorted(names):
            path = self.path(name)
            if path is not None:
                source = "file" if path.is_relative_to(self.directory) else "hub"
                found.append(LoraInfo(name=name, path=str(path), size_bytes=path.stat().st_size, source=source))
        return found


def fetch_hub_loras(catalog: LoraCatalog, timeout_s: float) -> list[str]:
    """Download the hub LoRAs that styles name and that are neither installed nor cached, all of them waited
    for at most `timeout_s` together. Returns the names still missing. Blocking: call at start, off the loop."""
    missing = [name for name in catalog.hub_sources if catalog.path(name) is None]
    if not missing or hub_offline():
        return missing

    def fetch(source: HubLora) -> None:
        from huggingface_hub import hf_hub_download

        hf_hub_download(
            source.repo, source.weight_name or DIFFUSERS_LORA_FILE, etag_timeout=timeout_s, cache_dir=catalog.hub_cache
        )

    # Unreachable or not there: the style reports the LoRA as missing.
    fetch_bounded(((name, partial(fetch, catalog.hub_sources[name])) for name in missing), timeout_s)
    return [name for name in missing if catalog.path(name) is None]
