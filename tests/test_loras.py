"""LoRAs: listed from the LoRA folder, applied per request and by styles, switched without reloading,
and no memory growth over many switches."""

from __future__ import annotations

import resource
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from engines.adapters import LoraAdapters
from engines.eager import EagerEngine
from engines.models import resolve_model
from forge.engine import Job, LoraWeight
from tests.conftest import RunningServer, install_loras, server_config, start_server
from tests.helpers import generate_pixels

pytestmark = pytest.mark.anyio


@pytest.fixture
async def lora_server(tmp_path: Path, tiny_model: Path, tiny_loras: dict[str, Path]) -> AsyncIterator[RunningServer]:
    data = tmp_path / "data"
    install_loras(data, tiny_loras, {"ink-lora": "ink-lora", "glow-lora": "glow-lora", "pixel-art-lora": "ink-lora"})
    async for running in start_server(server_config(data, tiny_model, max_loras=2)):
        yield running


async def test_installed_loras_are_listed_and_unlock_their_styles(lora_server: RunningServer) -> None:
    listing = (await lora_server.client.get("/v1/loras")).json()
    assert [lora["name"] for lora in listing["items"]] == ["glow-lora", "ink-lora", "pixel-art-lora"]
    assert all(lora["size_bytes"] > 0 and lora["source"] == "file" for lora in listing["items"])
    styles = {s["name"]: s for s in (await lora_server.client.get("/v1/styles")).json()["items"]}
    assert styles["pixel-art-lora"]["available"] is True
    assert styles["anime-character-lora"]["available"] is False


async def test_weight_zero_is_the_base_image_and_weight_one_is_not(lora_server: RunningServer) -> None:
    client = lora_server.client
    _, base = await generate_pixels(client, seed=11)
    _, zero = await generate_pixels(client, seed=11, loras=[{"name": "ink-lora", "weight": 0.0}])
    view, one = await generate_pixels(client, seed=11, loras=[{"name": "ink-lora", "weight": 1.0}])
    _, both = await generate_pixels(client, seed=11, loras=[{"name": "ink-lora"}, {"name": "glow-lora"}])
    _, base_again = await generate_pixels(client, seed=11)
    assert np.array_equal(base, zero)
    assert not np.array_equal(base, one) and not np.array_equal(one, both)
    assert np.array_equal(base, base_again)  # switching back leaves nothing behind
    assert view["request"]["loras"] == [{"name": "ink-lora", "weight": 1.0}]


async def test_a_style_lora_applies_and_the_request_can_reweight_it(lora_server: RunningServer) -> None:
    client = lora_server.client
    _, styled = await generate_pixels(client, seed=4, style="pixel-art-lora")
    _, plain_style = await generate_pixels(client, seed=4, style="pixel-art")
    view, off = await generate_pixels(
        client, seed=4, style="pixel-art-lora", loras=[{"name": "pixel-art-lora", "weight": 0}]
    )
    assert not np.array_equal(styled, plain_style)
    assert np.array_equal(off, plain_style)
    assert view["request"]["loras"] == [{"name": "pixel-art-lora", "weight": 0.0}]


LORA_ERRORS: list[tuple[object, str, str, str]] = [
    ([{"name": "missing-lora"}], "loras[0].name", "lora_missing", "missing-lora.safetensors"),
    ([{"name": "ink-lora"}, {"name": "a"}, {"name": "b"}], "loras", "max_length", "at most 2"),
    ([{"name": "ink-lora", "weight": 9}], "loras[0].weight", "maximum", ""),
    ([{"name": "../etc/passwd"}], "loras[0].name", "pattern", ""),
    ([{"weight": 1}], "loras[0].name", "required", ""),
]


async def test_lora_errors(lora_server: RunningServer) -> None:
    for loras, field, rule, text in LORA_ERRORS:
        response = await lora_server.client.post("/v1/generations", json={"prompt": "x", "loras": loras})
        assert response.status_code == 422, (loras, response.text)
        error = response.json()["error"]
        assert (error["field"], error["rule"]) == (field, rule), (loras, error)
        assert text in error["message"]


async def test_a_lora_dropped_in_while_running_is_usable(
    lora_server: RunningServer, tiny_loras: dict[str, Path]
) -> None:
    data = Path(lora_server.handle.config.data_dir)
    install_loras(data, tiny_loras, {"fresh-lora": "glow-lora"})
    names = [lora["name"] for lora in (await lora_server.client.get("/v1/loras")).json()["items"]]
    assert "fresh-lora" in names
    await generate_pixels(lora_server.client, loras=[{"name": "fresh-lora", "weight": 0.5}])


def _rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_two_hundred_switches_do_not_grow_memory(tiny_model: Path, tiny_loras: dict[str, Path]) -> None:
    model = resolve_model(str(tiny_model), tiny_model.parent, 1)
    engine = EagerEngine(model, "cpu")
    ink, glow = (LoraWeight(name=n, path=str(p), weight=0.8) for n, p in tiny_loras.items())
    sets = [[ink], [glow], [ink, glow], []]

    def switch(count: int) -> None:
        for index in range(count):
            engine.adapters.activate(sets[index % len(sets)])
            engine.run(
                Job(model=model, prompt="x", negative_prompt="", width=64, height=64, seeds=[index], steps=1,
                    guidance_scale=1.0, scheduler="euler")
            )  # fmt: skip

    switch(20)  # allocator pools and lazy state settle
    before = _rss_mib()
    switch(200)
    after = _rss_mib()
    print(f"RSS over 200 LoRA switches: {before:.1f} MiB -> {after:.1f} MiB ({after - before:+.1f} MiB)")
    assert sorted(engine.adapters.resident) == ["glow_lora", "ink_lora"]  # loaded once each, never again
    assert after - before < 25


def test_resident_adapters_are_bounded(tiny_model: Path, tiny_loras: dict[str, Path]) -> None:
    model = resolve_model(str(tiny_model), tiny_model.parent, 1)
    engine = EagerEngine(model, "cpu")
    adapters = LoraAdapters(engine.pipe, max_resident=1)
    ink, glow = (LoraWeight(name=n, path=str(p), weight=1.0) for n, p in tiny_loras.items())
    adapters.activate([ink])
    adapters.activate([glow])
    assert adapters.resident == ["glow_lora"]


def test_a_style_lora_from_the_hub_is_used_from_the_cache(tmp_path: Path, tiny_loras: dict[str, Path]) -> None:
    """A hub LoRA that a style names counts as installed once it is in the Hugging Face cache."""
    import shutil

    from forge.loras import HubLora, LoraCatalog, fetch_hub_loras

    cache = tmp_path / "hub"
    catalog = LoraCatalog(
        tmp_path / "loras", {"ink": HubLora(repo="someone/ink", weight_name="ink.safetensors")}, cache
    )
    assert catalog.path("ink") is None
    assert fetch_hub_loras(catalog, 0.5) == ["ink"]  # offline in tests: still missing, and quickly
    assert "someone/ink" in catalog.missing_message("ink")
    snapshot = cache / "models--someone--ink" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (cache / "models--someone--ink" / "refs").mkdir()
    (cache / "models--someone--ink" / "refs" / "main").write_text("0123abcd")
    shutil.copy(tiny_loras["ink-lora"], snapshot / "ink.safetensors")
    assert catalog.path("ink") == snapshot / "ink.safetensors"
    assert [(lora.name, lora.source) for lora in catalog.installed()] == [("ink", "hub")]
