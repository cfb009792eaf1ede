"""The model manager: several base models loaded on demand under a memory budget, admin load/unload,
damaged weights reported by file while the other models keep serving, and no growth across switches."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engines.cache import ModelCache
from engines.loader import BackendSettings, load_engine
from engines.models import resolve_model
from tests.conftest import RunningServer, server_config, start_server
from tests.helpers import generate_pixels, submit, wait_for_state
from tests.ldm_checkpoint import write_ldm_checkpoint
from tests.test_loras import _rss_mib

pytestmark = pytest.mark.anyio
TINY_BYTES = 7_000_000  # about what one tiny pipeline holds; the budget below fits two


def _damaged_copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    weights = target / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a download cut short
    return weights


@pytest.fixture
async def multi(tmp_path: Path, tiny_model: Path, other_tiny_models: list[Path]) -> AsyncIterator[RunningServer]:
    broken = _damaged_copy(tiny_model, tmp_path / "broken")
    plain = tmp_path / "plain-sdxl"  # a model that is not the tiny one: no ControlNets unless configured
    shutil.copytree(tiny_model, plain)
    (plain / "chara_forge_tiny.json").unlink()
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    models = {
        "alt": str(other_tiny_models[0]),
        "alt2": str(other_tiny_models[1]),
        "broken": str(broken.parent.parent),
        "plain": str(plain),
        "ckpt": str(tmp_path / "bad.safetensors"),
        "single": str(write_ldm_checkpoint(tiny_model, tmp_path / "tiny-sdxl.safetensors")),
    }
    config = server_config(tmp_path / "data", tiny_model, models=models, model_memory_gb=2.5 * TINY_BYTES / 1e9)
    async for running in start_server(config):
        yield running


async def _models(server: RunningServer) -> dict[str, dict[str, Any]]:
    return {model["id"]: model for model in (await server.client.get("/v1/models")).json()["items"]}


async def test_models_load_on_demand_and_the_least_recent_makes_room(multi: RunningServer) -> None:
    client = multi.client
    listed = await _models(multi)
    assert list(listed) == ["tiny-sdxl", "alt", "alt2", "broken", "plain", "ckpt", "single"]
    assert listed["tiny-sdxl"]["default"] and listed["tiny-sdxl"]["state"] == "loaded"
    assert {listed[m]["state"] for m in ("alt", "alt2", "broken", "ckpt")} == {"not_loaded"}
    assert listed["ckpt"]["format"] == listed["single"]["format"] == "single_file"

    _, base = await generate_pixels(client, seed=5)
    view, alt = await generate_pixels(client, seed=5, model="alt")
    assert view["request"]["model"] == "alt" and not np.array_equal(base, alt)
    listed = await _models(multi)
    assert listed["alt"]["state"] == "loaded" and listed["alt"]["devices"][0]["memory_bytes"] > 1_000_000
    assert listed["alt"]["last_used"] is not None

    await generate_pixels(client, seed=5, model="alt2")
    listed = await _models(multi)
    assert (listed["alt"]["state"], listed["alt2"]["state"]) == ("not_loaded", "loaded")  # over budget: LRU left
    assert listed["tiny-sdxl"]["state"] == "loaded"  # the default is pinned
    _, alt_again = await generate_pixels(client, seed=5, model="alt")
    assert np.array_equal(alt, alt_again)


async def test_a_single_checkpoint_file_loads_as_the_same_model(multi: RunningServer) -> None:
    """The default model's weights, written as one original-layout file, give the same pixels."""
    _, from_folder = await generate_pixels(multi.client, seed=21)
    view, from_file = await generate_pixels(multi.client, seed=21, model="single")
    assert view["request"]["model"] == "single"
    assert np.array_equal(from_folder, from_file)


async def test_damaged_weights_fail_with_the_file_named_and_others_keep_serving(multi: RunningServer) -> None:
    client = multi.client
    for model_id, file in (("broken", "unet/diffusion_pytorch_model.safetensors"), ("ckpt", "bad.safetensors")):
        task = await wait_for_state(client, (await submit(client, model=model_id))["id"])
        assert task["state"] == "failed"
        assert task["error"]["code"] == "model_unavailable"
        assert file in task["error"]["message"] and "corrupt or truncated" in task["error"]["message"]
        status = (await _models(multi))[model_id]
        assert status["state"] == "unavailable" and file in status["error"]
        again = await client.post("/v1/generations", json={"prompt": "x", "model": model_id})
        assert again.status_code == 409
        assert (again.json()["error"]["code"], again.json()["error"]["field"]) == ("model_unavailable", "model")
    await generate_pixels(client)
    await generate_pixels(client, model="alt")


async def test_admin_load_and_unload(multi: RunningServer) -> None:
    client = multi.client
    loaded = await client.post("/v1/models/alt2/load")
    assert loaded.status_code == 200 and loaded.json()["state"] == "loaded"
    unloaded = await client.post("/v1/models/alt2/unload")
    assert unloaded.status_code == 200 and unloaded.json()["state"] == "not_loaded"
    pinned = await client.post("/v1/models/tiny-sdxl/unload")
    assert pinned.status_code == 409 and pinned.json()["error"]["rule"] == "pinned"
    assert (await client.post("/v1/models/nope/load")).status_code == 404
    failed = await client.post("/v1/models/broken/load")
    assert failed.status_code == 409 and failed.json()["error"]["code"] == "model_unavailable"
    assert (await client.get("/v1/models/broken")).json()["state"] == "unavailable"


async def test_request_errors_name_the_model_field(multi: RunningServer) -> None:
    unknown = await multi.client.post("/v1/generations", json={"prompt": "x", "model": "sdxl-turbo"})
    assert unknown.status_code == 422
    assert (unknown.json()["error"]["field"], unknown.json()["error"]["rule"]) == ("model", "unknown")
    no_controlnet = await multi.client.post(
        "/v1/generations", json={"prompt": "x", "model": "plain", "control": {"type": "openpose", "pose": "front"}}
    )
    assert no_controlnet.status_code == 422
    error = no_controlnet.json()["error"]
    assert (error["field"], error["rule"]) == ("control.type", "controlnet_missing")
    assert "FORGE_CONTROLNET_OPENPOSE" in error["message"]
    too_small = await multi.client.post("/v1/generations", json={"prompt": "x", "model": "plain", "width": 128})
    assert too_small.status_code == 422 and "plain" in too_small.json()["error"]["message"]


async def test_admin_endpoints_need_the_key_when_one_is_set(tmp_path: Path, tiny_model: Path) -> None:
    config = server_config(tmp_path / "data", tiny_model, admin_key="s3cret")
    async for running in start_server(config):
        client = running.client
        missing = await client.post("/v1/models/tiny-sdxl/load")
        wrong = await client.post("/v1/models/tiny-sdxl/load", headers={"authorization": "Bearer nope"})
        right = await client.post("/v1/models/tiny-sdxl/load", headers={"authorization": "Bearer s3cret"})
        assert (missing.status_code, wrong.status_code, right.status_code) == (401, 403, 200)
        assert missing.json()["error"]["field"] == "Authorization"


def test_switching_models_does_not_grow_memory(tiny_model: Path, other_tiny_models: list[Path]) -> None:
    pinned = resolve_model(str(tiny_model), tiny_model.parent, 1)
    first, second = (
        replace(resolve_model(str(path), path.parent, 1), id=f"m{index}")
        for index, path in enumerate(other_tiny_models)
    )
    cache = ModelCache(
        "cpu", int(2.5 * TINY_BYTES), pinned.id, lambda model: load_engine(BackendSettings(), model, "cpu")
    )
    cache.get(pinned)

    def switch(count: int) -> None:
        for index in range(count):
            cache.get(first if index % 2 else second)
            assert len(cache.loaded()) == 2

    switch(2)
    before = _rss_mib()
    switch(12)  # a leaked tiny pipeline is ~7 MB, so a leak per switch would show as 80 MB and more
    after = _rss_mib()
    print(f"RSS over 12 model switches: {before:.1f} MiB -> {after:.1f} MiB ({after - before:+.1f} MiB)")
    assert after - before < 40
    cache.close()
