"""IP-Adapters: where one comes from (a hub repo or a local folder, in the layout h94/IP-Adapter uses),
whether it is here, and fetching the hub ones at start."""

from __future__ import annotations

from functools import partial
from pathlib import Path, PurePosixPath

import msgspec

from forge.hub_fetch import fetch_bounded, hub_offline

# The recommended adapter: "plus" reads the CLIP ViT-H encoder's patch features, so it carries a drawn or anime
# character's look, where face-embedding adapters (FaceID, InstantID) find no face to embed.
RECOMMENDED_REPO = "h94/IP-Adapter"
RECOMMENDED_WEIGHT = "sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors"
VIT_H_ENCODER = "models/image_encoder"
ENCODER_FILES = ("config.json", "model.safetensors")


class IpAdapterSource(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`weight_name`: the adapter file inside `source`, with its subfolder. `image_encoder`: the CLIP vision
    encoder's folder, relative to the weight's subfolder when it is one name, else to `source`'s root (as
    diffusers' `load_ip_adapter` reads `image_encoder_folder`)."""

    source: str
    weight_name: str
    image_encoder: str = VIT_H_ENCODER

    @property
    def subfolder(self) -> str:
        parent = str(PurePosixPath(self.weight_name).parent)
        return "" if parent == "." else parent

    @property
    def file_name(self) -> str:
        return PurePosixPath(self.weight_name).name

    @property
    def encoder_path(self) -> str:
        if "/" in self.image_encoder:
            return self.image_encoder
        return str(PurePosixPath(self.subfolder, self.image_encoder)) if self.subfolder else self.image_encoder

    @property
    def is_local(self) -> bool:
        return self.source.startswith((".", "/", "~")) or Path(self.source).expanduser().is_dir()

    def files(self) -> list[str]:
        return [self.weight_name] + [f"{self.encoder_path}/{name}" for name in ENCODER_FILES]

    def installed(self, hub_cache: Path | None = None) -> bool:
        """Every file it needs is on this machine (in the folder, or in the Hugging Face cache)."""
        if self.is_local:
            root = Path(self.source).expanduser()
            return all((root / name).is_file() for name in self.files())
        from huggingface_hub import try_to_load_from_cache

        return all(
            isinstance(try_to_load_from_cache(self.source, name, cache_dir=hub_cache), str) for name in self.files()
        )


RECOMMENDED = IpAdapterSource(source=RECOMMENDED_REPO, weight_name=RECOMMENDED_WEIGHT)


def fetch_hub_ip_adapters(adapters: dict[str, IpAdapterSource], timeout_s: float) -> list[str]:
    """Download the hub adapters that are not cached yet, all of them waited for at most `timeout_s` together (a
    large download goes on in the background and is used once complete). Returns the names still missing.
    Blocking: call at start, off the loop."""
    missing = [name for name, source in adapters.items() if not source.installed()]
    if not missing or hub_offline():
        return missing

    def fetch(source: IpAdapterSource) -> None:
        from huggingface_hub import hf_hub_download

        for name in source.files():
            hf_hub_download(source.source, name, etag_timeout=timeout_s)

    # Unreachable: references naming it are refused until it is here.
    hub = [name for name in missing if not adapters[name].is_local]
    fetch_bounded(((name, partial(fetch, adapters[name])) for name in hub), timeout_s)
    return [name for name in missing if not adapters[name].installed()]
