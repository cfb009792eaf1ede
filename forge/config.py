"""Configuration: a frozen Struct read from a TOML file, then overridden by `FORGE_<KEY>` variables."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from forge.errors import ConfigError

Backend = Literal["eager", "compiled", "tensorrt"]

Port = Annotated[int, Meta(ge=0, le=65535)]


class Config(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    api_port: Port = 8000
    ui_port: Port = 7860
    mcp_port: Port = 8001
    enable_ui: bool = True
    enable_mcp: bool = True
    # Comma-separated Host and Origin values MCP accepts (DNS-rebinding protection); empty: loopback only.
    mcp_allowed_hosts: str = ""
    mcp_allowed_origins: str = ""
    data_dir: str = "./data"
    # "auto": SDXL base from the Hugging Face cache or hub, else the built-in tiny model.
    # "tiny": always the built-in tiny model. Anything else: a local diffusers folder or a hub repo id.
    model: str = "auto"
    backend: Backend = "eager"
    # "auto": every visible CUDA device, else one CPU engine. Otherwise a comma-separated list.
    devices: str = "auto"
    # Intra-op threads for a CPU engine; 0: all cores but one, which stays free for the event loop and I/O.
    cpu_threads: Annotated[int, Meta(ge=0, le=1024)] = 0
    hub_timeout_s: Annotated[float, Meta(gt=0, le=60)] = 3.0
    max_attempts: Annotated[int, Meta(ge=1, le=20)] = 3
    max_queue: Annotated[int, Meta(ge=1)] = 10_000
    max_body_bytes: Annotated[int, Meta(ge=1024)] = 1024 * 1024
    max_prompt_chars: Annotated[int, Meta(ge=1, le=100_000)] = 2000
    preview_every: Annotated[int, Meta(ge=0)] = 2  # steps between latent previews; 0 turns them off
    preview_size: Annotated[int, Meta(ge=16, le=512)] = 128
    drain_seconds: Annotated[float, Meta(ge=0)] = 30.0
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir).expanduser()

    @property
    def outputs_path(self) -> Path:
        return self.data_path / "outputs"

    @property
    def database_path(self) -> Path:
        return self.data_path / "forge.sqlite3"


ENV_PREFIX = "FORGE_"


def env_overrides(environ: Mapping[str, str]) -> dict[str, str]:
    known = set(Config.__struct_fields__)
    overrides = {}
    for name, value in environ.items():
        if name.startswith(ENV_PREFIX):
            key = name[len(ENV_PREFIX) :].lower()
            if key not in known:
                raise ConfigError(f"unknown setting {name}", field=name)
            overrides[key] = value
    return overrides


def load_config(
    path: Path | None = None, *, environ: Mapping[str, str] | None = None, overrides: Mapping[str, object] = {}
) -> Config:
    """Merge, lowest first: defaults, the TOML file, `FORGE_*` variables (from os.environ unless `environ`
    is given), then `overrides` (command-line options)."""
    raw: dict[str, object] = {}
    if path is not None:
        try:
            raw.update(tomllib.loads(path.read_text()))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    raw.update(env_overrides(os.environ if environ is None else environ))
    raw.update(overrides)
    try:
        # strict=False lets environment strings become ints, floats and bools.
        return msgspec.convert(raw, Config, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from exc
