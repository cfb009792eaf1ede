from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import httpx
import pytest

from actors.supervisor import ServerHandle, serve
from engines.tiny import build_tiny_sdxl
from forge.config import Config, load_config
from tests.redis_server import REDIS_SERVER, RedisServer, running_redis

if TYPE_CHECKING:
    from engines.compiled import CompileOptions

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # hypercorn is served through its asyncio worker


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SDXL folder, built once per run and loaded with from_pretrained by every test."""
    return build_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl")


def compiled_options(cache: Path) -> CompileOptions:
    """The settings of the cold start that made `compiled_cache`, which compiled-engine tests start from."""
    from engines.compiled import CompileOptions

    return CompileOptions(cache_dir=cache, max_rows=8, warm_sizes=((96, 64),))


@pytest.fixture(scope="session")
def compiled_cache(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    """A compile cache after a cold start of the compiled engine on the tiny model (its block graphs, about 45 s
    on 2 cores), made once per run. Tests copy it and start from it, as a restart does."""
    from engines.compiled import CompiledEngine
    from engines.models import resolve_model
    from tests.helpers import on_a_thread

    cache = tmp_path_factory.mktemp("compiled") / "cache"
    compiled: list[int] = []

    def cold_start() -> None:
        engine = CompiledEngine(resolve_model(str(tiny_model), tiny_model.parent, 1), "cpu", compiled_options(cache))
        engine.warm()
        compiled.append(engine.compile_counts.compiles)

    on_a_thread(cold_start)
    assert compiled and compiled[0] > 0
    return cache


# The web UI and MCP adapters, for the tests that use them: building Gradio's app and the MCP server at every
# start took about a second, and most tests speak REST only.
ADAPTERS = {"enable_ui": True, "enable_mcp": True}


def server_config(data_dir: Path, model: Path, **overrides: object) -> Config:
    """REST only unless the overrides include ADAPTERS."""
    settings: dict[str, object] = {
        "data_dir": str(data_dir),
        "model": str(model),
        "api_port": 0,
        "mcp_port": 0,
        "ui_port": 0,
        "host": "127.0.0.1",
        "preview_every": 1,
        "drain_seconds": 5,
        "enable_ui": False,
        "enable_mcp": False,
    }
    settings.update(overrides)
    return load_config(None, environ={}, overrides=settings)


class RunningServer:
    def __init__(self, handle: ServerHandle, client: httpx.AsyncClient) -> None:
        self.handle = handle
        self.client = client
        self.base_url = f"http://127.0.0.1:{handle.api_port}"
        self.ws_url = f"ws://127.0.0.1:{handle.api_port}"


async def wait_ready(client: httpx.AsyncClient, timeout_s: float = 60) -> None:
    with anyio.fail_after(timeout_s):
        while (await client.get("/readyz")).status_code != 200:
            await anyio.sleep(0.05)


async def start_server(config: Config) -> AsyncIterator[RunningServer]:
    shutdown = anyio.Event()
    async with anyio.create_task_group() as tg:
        handle: ServerHandle = await tg.start(
            lambda task_status: serve(config, shutdown=shutdown, task_status=task_status)
        )
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{handle.api_port}", timeout=30) as client:
            await wait_ready(client)
            yield RunningServer(handle, client)
        shutdown.set()


@pytest.fixture
async def server(tmp_path: Path, tiny_model: Path, request: pytest.FixtureRequest) -> AsyncIterator[RunningServer]:
    """A real server (hypercorn on 127.0.0.1, real SQLite file, tiny model on the CPU) in this event loop;
    with its web UI and MCP server too for tests marked `adapters`."""
    adapters = ADAPTERS if request.node.get_closest_marker("adapters") else {}
    async for running in start_server(server_config(tmp_path / "data", tiny_model, **adapters)):
        yield running


@pytest.fixture
async def uncached_server(tmp_path: Path, tiny_model: Path) -> AsyncIterator[RunningServer]:
    """A server without the result cache: a repeated request runs again, so equal images show determinism."""
    async for running in start_server(server_config(tmp_path / "data", tiny_model, result_cache=False)):
        yield running


@pytest.fixture(scope="session")
def tiny_loras(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> dict[str, Path]:
    """Two LoRAs for the tiny model, made with peft and saved as diffusers LoRA files."""
    from engines.tiny_extras import build_tiny_lora

    folder = tmp_path_factory.mktemp("loras")
    return {
        name: build_tiny_lora(tiny_model, folder / f"{name}.safetensors", seed)
        for seed, name in enumerate(("ink-lora", "glow-lora"), start=1)
    }


def install_loras(data_dir: Path, loras: dict[str, Path], names: dict[str, str] | None = None) -> Path:
    """Copy LoRA files into a server's LoRA folder, optionally under other names ({installed: source})."""
    import shutil

    folder = data_dir / "models" / "loras"
    folder.mkdir(parents=True, exist_ok=True)
    for installed, source in (names or {name: name for name in loras}).items():
        shutil.copy(loras[source], folder / f"{installed}.safetensors")
    return folder


@pytest.fixture(scope="session")
def other_tiny_models(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two more tiny models with their own random weights, for switching between base models."""
    folder = tmp_path_factory.mktemp("more-models")
    return [build_tiny_sdxl(folder / f"tiny-{seed}", seed=seed) for seed in (1, 2)]


@pytest.fixture(scope="session")
def postprocess_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny upscalers (RRDBNet x2, x4) and a tiny ONNX segmentation model, laid out as a models folder."""
    from engines.tiny_extras import build_tiny_segmenter, build_tiny_upscaler

    models = tmp_path_factory.mktemp("postprocess-models")
    build_tiny_upscaler(models / "upscalers" / "RealESRGAN_x4plus.pth", 4)
    build_tiny_upscaler(models / "upscalers" / "RealESRGAN_x2plus.pth", 2, seed=1)
    for name in ("isnet-general-use", "isnet-anime", "u2net"):
        build_tiny_segmenter(models / "rembg" / f"{name}.onnx")
    return models


def install_postprocess_models(data_dir: Path, models: Path) -> None:
    import shutil

    shutil.copytree(models, data_dir / "models", dirs_exist_ok=True)


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    """A real redis-server of its own (appendonly, fsync always) on a free loopback port; skipped, saying why,
    where Debian's redis-server is not installed."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (Debian package redis-server); the Redis store tests need one")
    async with running_redis(tmp_path / "redis") as running:
        yield running
