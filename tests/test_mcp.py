"""The MCP adapter with the real `mcp` client, over streamable HTTP and SSE, against the running server."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
from mcp.client.session import ClientSession
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp.types import ImageContent, ResourceLink, TextContent
from PIL import Image

from actors.encoding import read_parameters
from tests.conftest import RunningServer
from tests.helpers import wait_for_state

pytestmark = [pytest.mark.anyio, pytest.mark.adapters]

TRANSPORTS = ["streamable-http", "sse"]


@asynccontextmanager
async def mcp_session(server: RunningServer, transport: str) -> AsyncIterator[ClientSession]:
    base = f"http://127.0.0.1:{server.handle.mcp_port}"
    connect = streamable_http_client(f"{base}/mcp") if transport == "streamable-http" else sse_client(f"{base}/sse")
    async with connect as streams, ClientSession(streams[0], streams[1]) as session:
        await session.initialize()
        yield session


def _text(result: Any) -> dict[str, Any]:
    texts = [c for c in result.content if isinstance(c, TextContent)]
    body: dict[str, Any] = json.loads(texts[0].text)
    return body


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_tools_are_listed_with_schemas(server: RunningServer, transport: str) -> None:
    async with mcp_session(server, transport) as session:
        tools = {tool.name: tool for tool in (await session.list_tools()).tools}
    assert set(tools) == {
        "generate_character",
        "get_generation",
        "cancel_generation",
        "list_styles",
        "create_character",
        "list_characters",
        "character_sheet",
        "animate_character",
    }
    schema = tools["generate_character"].input_schema
    assert schema["required"] == ["prompt"]
    assert schema["properties"]["num_images"]["maximum"] == 8
    assert "progress" in (tools["generate_character"].description or "")


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_generate_and_wait_with_progress_images_and_resource(server: RunningServer, transport: str) -> None:
    reported: list[tuple[float, float | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        reported.append((progress, total))

    async with mcp_session(server, transport) as session:
        result = await session.call_tool(
            "generate_character",
            {"prompt": "a dwarf alchemist", "num_images": 2, "seed": 11, "size": "landscape"},
            progress_callback=on_progress,
        )
        assert not result.is_error, result.content
        summary = _text(result)
        images = [c for c in result.content if isinstance(c, ImageContent)]
        links = [c for c in result.content if isinstance(c, ResourceLink)]
        resource = await session.read_resource(str(links[1].uri))

    assert summary["state"] == "succeeded" and summary["seeds"] == [11, 12]
    assert len(images) == 2 and images[0].mime_type == "image/png"
    thumbnail = Image.open(io.BytesIO(base64.b64decode(images[0].data)))
    assert thumbnail.size == (80, 64)  # the tiny model's landscape preset, within the thumbnail bound
    assert [str(link.uri) for link in links] == summary["resources"]
    assert reported and reported[-1] == (4, 4)
    full = Image.open(io.BytesIO(base64.b64decode(resource.contents[0].blob)))  # type: ignore[union-attr]
    assert full.size == (80, 64) and "Seed: 12" in (read_parameters(full) or "")
    # The same task is visible over REST.
    rest = (await server.client.get(f"/v1/generations/{summary['id']}")).json()
    assert rest["state"] == "succeeded" and len(rest["images"]) == 2


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_generate_without_wait_then_get_and_cancel(server: RunningServer, transport: str) -> None:
    async with mcp_session(server, transport) as session:
        started = _text(
            await session.call_tool("generate_character", {"prompt": "a giant golem", "size": "512x512", "wait": False})
        )
        assert started["state"] == "queued"
        await wait_for_state(server.client, started["id"], {"running", "succeeded"})
        cancelled = _text(await session.call_tool("cancel_generation", {"id": started["id"]}))
        fetched = _text(await session.call_tool("get_generation", {"id": started["id"]}))
    assert cancelled["state"] in {"cancelled", "succeeded"}
    assert fetched["state"] == cancelled["state"]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_errors_carry_the_rest_codes_and_fields(server: RunningServer, transport: str) -> None:
    async with mcp_session(server, transport) as session:
        bad_size = await session.call_tool("generate_character", {"prompt": "x", "size": "100x64"})
        unknown = await session.call_tool("get_generation", {"id": "nope"})
        styles = await session.call_tool("list_styles", {})
    assert bad_size.is_error and unknown.is_error
    error = json.loads(bad_size.content[0].text)  # type: ignore[union-attr]
    assert (error["code"], error["field"], error["rule"]) == ("invalid_request", "width", "multiple_of")
    assert json.loads(unknown.content[0].text)["code"] == "not_found"  # type: ignore[union-attr]
    listed = {s["name"]: s["description"] for s in json.loads(styles.content[0].text)}  # type: ignore[union-attr]
    rest = (await server.client.get("/v1/styles")).json()["items"]
    assert listed == {s["name"]: s["description"] for s in rest}
    assert {"none", "anime", "pixel-art", "character-sheet", "anime-character-lora"} <= set(listed)


async def test_styles_pose_and_model_through_mcp(server: RunningServer) -> None:
    arguments = {
        "prompt": "a rogue",
        "style": ["dark-fantasy-rpg", "chibi"],
        "pose": "t-pose",
        "model": "tiny-sdxl",
        "postprocess": {"pixel_art": {"factor": 4, "palette": "nes"}, "sprite_sheet": {}},
        "clip_skip": 1,
    }
    async with mcp_session(server, "streamable-http") as session:
        done = await session.call_tool("generate_character", arguments)
        bad_skip = await session.call_tool("generate_character", {"prompt": "x", "clip_skip": 13})
        hires = {"scale": 1.5, "steps": 2, "denoise": 0.5}
        larger = await session.call_tool("generate_character", {"prompt": "a rogue", "size": "64x64", "hires": hires})
        bad_pose = await session.call_tool("generate_character", {"prompt": "x", "pose": "moonwalk"})
        bad_step = await session.call_tool("generate_character", {"prompt": "x", "postprocess": {"blur": 1}})
        varied = await session.call_tool(
            "generate_character",
            {"prompt": "a {red|blue} rogue", "size": "64x64", "num_images": 2, "variations": "combinatorial"},
        )
        grid = {"x": {"field": "guidance_scale", "values": [1, 5]}}
        matrix = await session.call_tool("generate_character", {"prompt": "a rogue", "size": "64x64", "grid": grid})
    assert [image["prompt"] for image in _text(varied)["images"]] == ["a red rogue", "a blue rogue"]
    assert _text(matrix)["grid"] and len(_text(matrix)["images"]) == 2
    assert not done.is_error
    spec = (await server.client.get(f"/v1/generations/{_text(done)['id']}")).json()["request"]
    assert spec["styles"] == ["dark-fantasy-rpg", "chibi"] and spec["model"] == "tiny-sdxl"
    assert spec["control"] == [
        {"type": "openpose", "image": None, "pose": "t-pose", "preprocess": False, "strength": 0.8, "start": 0.0,
         "end": 1.0}
    ]  # fmt: skip
    assert bad_pose.is_error and json.loads(bad_pose.content[0].text)["field"] == "control.pose"  # type: ignore[union-attr]
    assert json.loads(bad_step.content[0].text)["field"] == "postprocess.blur"  # type: ignore[union-attr]
    assert spec["postprocess"]["pixel_art"]["palette"] == "nes"
    assert spec["clip_skip"] == 1
    larger_spec = (await server.client.get(f"/v1/generations/{_text(larger)['id']}")).json()["request"]
    assert larger_spec["hires"]["width"] == 96 and larger_spec["hires"]["steps"] == 2
    assert json.loads(bad_skip.content[0].text)["field"] == "clip_skip"  # type: ignore[union-attr]


async def test_cancelling_the_mcp_request_cancels_the_task(server: RunningServer) -> None:
    async def running_task_id() -> str:
        with anyio.fail_after(30):
            while True:
                items = (await server.client.get("/v1/generations?state=running")).json()["items"]
                if items:
                    return str(items[0]["id"])
                await anyio.sleep(0.05)

    async with mcp_session(server, "streamable-http") as session:
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                session.call_tool, "generate_character", {"prompt": "a slow titan", "size": "512x512", "num_images": 8}
            )
            task_id = await running_task_id()
            tg.cancel_scope.cancel()  # the client abandons the request: it tells the server it is cancelled
        view = await wait_for_state(server.client, task_id, timeout_s=30)
    assert view["state"] == "cancelled"


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"Host": "evil.example:80"}, 421),
        ({"Origin": "http://evil.example"}, 403),
        ({"Origin": "http://localhost:3000"}, None),
    ],
)
async def test_dns_rebinding_protection(server: RunningServer, headers: dict[str, str], status: int | None) -> None:
    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-11-25",
            "capabilities": {},
            "clientInfo": {"name": "probe", "version": "0"},
        },
    }
    async with httpx.AsyncClient() as client:
        response = await client.post(
            f"http://127.0.0.1:{server.handle.mcp_port}/mcp",
            json=body,
            headers={"Accept": "application/json, text/event-stream", **headers},
        )
    if status is None:
        assert response.status_code == 200, response.text
    else:
        assert response.status_code == status


@pytest.mark.parametrize(
    ("headers", "status"), [({"Host": "evil.example:80"}, 421), ({"Origin": "http://evil.example"}, 403)]
)
async def test_dns_rebinding_protection_on_sse(server: RunningServer, headers: dict[str, str], status: int) -> None:
    async with httpx.AsyncClient(timeout=5) as client:
        response = await client.get(f"http://127.0.0.1:{server.handle.mcp_port}/sse", headers=headers)
    assert response.status_code == status


async def test_an_earlier_generation_is_repainted_by_its_resource_uri(server: RunningServer) -> None:
    import base64 as b64

    from tests.helpers import png_bytes, square_image

    async with mcp_session(server, "streamable-http") as session:
        first = _text(await session.call_tool("generate_character", {"prompt": "a knight", "size": "64x64"}))
        uri = first["resources"][0]
        mask = b64.b64encode(png_bytes(square_image(64, (16, 16, 47, 47)))).decode()
        edited = await session.call_tool(
            "generate_character", {"prompt": "a knight with a red cape", "init_image": uri, "mask": mask, "strength": 1}
        )
        assert not edited.is_error, edited.content
        summary = _text(edited)
        missing = await session.call_tool(
            "generate_character", {"prompt": "x", "init_image": "chara-forge://generations/" + "0" * 32 + "/images/0"}
        )
    assert summary["request"]["strength"] == 1.0 and summary["request"]["mask"].startswith("up_")
    assert (summary["request"]["width"], summary["request"]["height"]) == (64, 64)
    assert missing.is_error and json.loads(missing.content[0].text)["code"] == "not_found"  # type: ignore[union-attr]


async def test_a_character_is_saved_from_a_generation_and_reused(server: RunningServer) -> None:
    async with mcp_session(server, "streamable-http") as session:
        first = _text(await session.call_tool("generate_character", {"prompt": "a dwarf smith", "size": "64x64"}))
        saved = await session.call_tool(
            "create_character",
            {"name": "brokk", "description": "Brokk, a dwarf smith", "references": [first["resources"][0]]},
        )
        assert not saved.is_error, saved.content
        listed = json.loads((await session.call_tool("list_characters", {})).content[0].text)  # type: ignore[union-attr]
        used = _text(await session.call_tool("generate_character", {"prompt": "at the forge", "character": "brokk"}))
        taken = await session.call_tool("create_character", {"name": "brokk", "description": "again"})
        own_reference = _text(
            await session.call_tool(
                "generate_character",
                {"prompt": "x", "size": "64x64", "references": [{"image": first["resources"][0], "mode": "style"}]},
            )
        )
        sheet = await session.call_tool("character_sheet", {"character": "brokk", "kind": "turnaround"})
        nobody = await session.call_tool("character_sheet", {"character": "nobody"})
    assert [c["name"] for c in listed] == ["brokk"] and listed[0]["references"][0].startswith("up_")
    assert used["request"]["character"]["name"] == "brokk"
    assert used["request"]["prompt"] == "Brokk, a dwarf smith, at the forge"
    assert used["request"]["references"][0]["image"] == listed[0]["references"][0]  # the character's reference
    assert own_reference["request"]["references"][0]["mode"] == "style"
    assert not sheet.is_error, sheet.content
    summary = json.loads(sheet.content[0].text)  # type: ignore[union-attr]
    assert len(summary["resources"]) == 4 and summary["request"]["character"]["name"] == "brokk"
    assert sum(isinstance(item, ImageContent) for item in sheet.content) == 4
    assert nobody.is_error and json.loads(nobody.content[0].text)["field"] == "character"  # type: ignore[union-attr]
    assert taken.is_error and json.loads(taken.content[0].text)["field"] == "name"  # type: ignore[union-attr]


async def test_animate_character_makes_a_cycle_with_its_files(server: RunningServer) -> None:
    character = (await server.client.post("/v1/characters", json={"name": "wisp", "description": "a ghost"})).json()
    arguments = {"character": "wisp", "action": "run", "directions": 1, "frames": 4, "size": "64x64", "steps": 2}
    async with mcp_session(server, "streamable-http") as session:
        done = await session.call_tool("animate_character", arguments)
        bad = await session.call_tool("animate_character", {"character": "wisp", "action": "moonwalk"})
    assert not done.is_error
    summary = _text(done)
    assert summary["request"]["character"]["id"] == character["id"] and len(summary["images"]) == 4
    assert [view["pose"] for view in summary["request"]["views"]] == [f"run-4f-s-{k}" for k in range(4)]
    gif = await server.client.get(summary["animation"]["directions"]["s"])
    assert gif.status_code == 200 and gif.headers["content-type"] == "image/gif"
    assert sum(isinstance(c, ImageContent) for c in done.content) == 4
    assert bad.is_error and json.loads(bad.content[0].text)["field"] == "action"  # type: ignore[union-attr]
