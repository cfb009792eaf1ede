"""The OpenAI Images API driven by the openai SDK against a real server."""

from __future__ import annotations

import base64
import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from actors.keys import KeyStore, SqliteKeys
from tests.conftest import RunningServer, server_config, start_server
from tests.helpers import gradient_image

pytestmark = pytest.mark.anyio


def sdk(server: RunningServer, key: str = "sk-anything", **options: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{server.base_url}/openai/v1", api_key=key, **options)


def png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return image


def png_file(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


async def test_generate_answers_base64_and_urls(server: RunningServer) -> None:
    async with sdk(server) as client:
        await _generate_both_ways(server, client)


async def _generate_both_ways(server: RunningServer, client: openai.AsyncOpenAI) -> None:
    answer = await client.images.generate(prompt="a knight", size="64x64", n=2, quality="low", model="gpt-image-1")
    assert answer.data is not None and len(answer.data) == 2 and answer.size == "64x64"
    assert all(png(base64.b64decode(item.b64_json or "")).size == (64, 64) for item in answer.data)
    tasks = (await server.client.get("/v1/generations")).json()["items"]
    assert tasks[0]["request"]["steps"] == 2 and tasks[0]["request"]["model"] == "tiny-sdxl"  # low: half of 4
    linked = await client.images.generate(prompt="a knight", size="64x64", response_format="url", style="vivid")
    assert linked.data is not None and linked.data[0].url
    assert png((await server.client.get(linked.data[0].url)).content).size == (64, 64)
    assert (await server.client.get("/v1/generations")).json()["items"][0]["request"]["styles"] == ["splash-art"]
    models = await client.models.list()
    assert [model.id async for model in models] == ["tiny-sdxl"]


async def test_edit_repaints_the_transparent_part_of_the_mask(server: RunningServer) -> None:
    init = gradient_image(64)
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (16, 16, 48, 48))  # transparent: repaint
    async with sdk(server) as client:
        answer = await client.images.edit(
            image=("init.png", png_file(init), "image/png"),
            mask=("mask.png", png_file(mask), "image/png"),
            prompt="a knight with a red plume",
        )
    assert answer.data is not None
    pixels = np.asarray(png(base64.b64decode(answer.data[0].b64_json or "")).convert("RGB"))
    kept = np.asarray(mask.getchannel("A")) > 0
    assert (pixels[kept] == np.asarray(init)[kept]).all()
    assert (pixels[~kept] != np.asarray(init)[~kept]).any()
    request = (await server.client.get("/v1/generations")).json()["items"][0]["request"]
    assert request["mask"] and request["strength"] == 1.0 and (request["width"], request["height"]) == (64, 64)


async def test_streaming_sends_partial_images_then_the_image(server: RunningServer) -> None:
    kinds = []
    async with sdk(server) as client:
        stream = await client.images.generate(
            prompt="a knight", size="64x64", stream=True, partial_images=2, quality="high"
        )
        async for event in stream:
            kinds.append(event.type)
            png(base64.b64decode(event.b64_json))
    assert kinds == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]


async def test_an_idempotency_key_makes_retries_one_task(server: RunningServer) -> None:
    async with sdk(server) as client:
        for _ in range(2):
            await client.images.generate(prompt="one knight", size="64x64", extra_headers={"Idempotency-Key": "k-1"})
    assert len((await server.client.get("/v1/generations")).json()["items"]) == 1


async def test_bad_requests_raise_the_sdks_typed_error_without_retries(server: RunningServer) -> None:
    calls = []

    async def count(request: httpx.Request) -> None:
        calls.append(request.url.path)

    async with sdk(server, http_client=openai.DefaultAsyncHttpxClient(event_hooks={"request": [count]})) as client:
        await _refusals(client, calls)


async def _refusals(client: openai.AsyncOpenAI, calls: list[str]) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        await client.images.generate(prompt="x", size="huge")
    assert "size" in refused.value.message and refused.value.param == "size"  # type: ignore[attr-defined]
    assert refused.value.response.headers["x-should-retry"] == "false" and len(calls) == 1
    with pytest.raises(openai.BadRequestError) as refused:  # never a silently different size
        await client.images.generate(prompt="x", size="65x65")
    assert "multiple of 8" in refused.value.message and refused.value.param == "size"  # type: ignore[attr-defined]
    with pytest.raises(openai.BadRequestError) as refused:  # beyond the tiny model's 512
        await client.images.generate(prompt="x", size="1024x1024")
    assert "from 64 to 512" in refused.value.message and refused.value.param == "size"  # type: ignore[attr-defined]
    with pytest.raises(openai.BadRequestError, match="no-such-style"):
        await client.images.generate(prompt="x", size="64x64", extra_body={"style": "no-such-style"})
    with pytest.raises(openai.BadRequestError, match="image"):
        await client.images.edit(image=("x.png", b"not an image", "image/png"), prompt="x")


@pytest.fixture
async def limited(tmp_path: Path, tiny_model: Path) -> AsyncIterator[tuple[RunningServer, str]]:
    data = tmp_path / "data"
    keys = KeyStore(SqliteKeys(data / "forge.sqlite3"))
    token = keys.create("alice", "tiny", ["generate"])[1]
    plans = {"tiny": {"requests": 1, "window_s": 3600, "max_queued": 0}}
    async for running in start_server(server_config(data, tiny_model, auth=True, plans=plans, local_plan="tiny")):
        yield running, token


async def test_auth_and_rate_limits_raise_the_sdks_errors(limited: tuple[RunningServer, str]) -> None:
    server, token = limited
    async with sdk(server, key="cf_wrong", max_retries=0) as stranger:
        with pytest.raises(openai.AuthenticationError):
            await stranger.images.generate(prompt="x", size="64x64")
    async with sdk(server, key=token, max_retries=0) as client:
        await client.images.generate(prompt="x", size="64x64")
        with pytest.raises(openai.RateLimitError) as limited_error:
            await client.images.generate(prompt="x", size="64x64")
    assert limited_error.value.response.headers.get("retry-after")
    assert "allows 1 generations per 3600 s" in limited_error.value.message  # our message
