"""Every invalid input gets a 4xx JSON error naming the field and the rule; nothing crashes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import RunningServer, server_config, start_server
from tests.helpers import gradient_image, png_bytes, submit, wait_for_state

pytestmark = pytest.mark.anyio

OK = {"prompt": "a dwarf blacksmith"}

# (case, body, status, field, rule). The tiny model accepts 64..512 pixels a side.
CASES: list[tuple[str, Any, int, str, str]] = [
    ("width not a multiple of 8", {**OK, "width": 100}, 422, "width", "multiple_of"),
    ("height not a multiple of 8", {**OK, "height": 70}, 422, "height", "multiple_of"),
    ("width below the model's bound", {**OK, "width": 32}, 422, "width", "range"),
    ("height above the model's bound", {**OK, "height": 1024}, 422, "height", "range"),
    ("width above the hard ceiling", {**OK, "width": 8192}, 422, "width", "maximum"),
    ("width zero", {**OK, "width": 0}, 422, "width", "minimum"),
    ("width as text", {**OK, "width": "wide"}, 422, "width", "type"),
    ("steps zero", {**OK, "steps": 0}, 422, "steps", "minimum"),
    ("steps too many", {**OK, "steps": 151}, 422, "steps", "maximum"),
    ("steps fractional", {**OK, "steps": 2.5}, 422, "steps", "type"),
    ("num_images zero", {**OK, "num_images": 0}, 422, "num_images", "minimum"),
    ("num_images nine", {**OK, "num_images": 9}, 422, "num_images", "maximum"),
    ("guidance negative", {**OK, "guidance_scale": -1}, 422, "guidance_scale", "minimum"),
    ("guidance huge", {**OK, "guidance_scale": 31}, 422, "guidance_scale", "maximum"),
    ("seed negative", {**OK, "seed": -1}, 422, "seed", "minimum"),
    ("seed beyond 32 bits", {**OK, "seed": 2**32}, 422, "seed", "maximum"),
    ("unknown scheduler", {**OK, "scheduler": "heun_x"}, 422, "scheduler", "enum"),
    ("unknown output format", {**OK, "output_format": "gif"}, 422, "output_format", "enum"),
    ("unknown tiling axis", {**OK, "tiling": "diagonal"}, 422, "tiling", "enum"),
    ("tiling as a boolean", {**OK, "tiling": True}, 422, "tiling", "type"),
    ("priority out of range", {**OK, "priority": 11}, 422, "priority", "maximum"),
    ("unknown style", {**OK, "style": "vaporwave"}, 422, "style", "unknown_style"),
    ("prompt missing", {"width": 64}, 422, "prompt", "required"),
    ("prompt empty", {"prompt": ""}, 422, "prompt", "min_length"),
    ("prompt blank", {"prompt": "   "}, 422, "prompt", "min_length"),
    ("prompt too long", {"prompt": "x" * 2001}, 422, "prompt", "max_length"),
    ("negative prompt too long", {**OK, "negative_prompt": "x" * 2001}, 422, "negative_prompt", "max_length"),
    ("prompt not a string", {"prompt": 42}, 422, "prompt", "type"),
    ("emphasis weight over 4", {"prompt": "a ((dwarf:3.8)) smith"}, 422, "prompt", "range"),
    ("negative emphasis weight", {**OK, "negative_prompt": "(blurry:-1)"}, 422, "negative_prompt", "range"),
    ("clip skip 13", {**OK, "clip_skip": 13}, 422, "clip_skip", "maximum"),
    ("unknown field", {**OK, "cfg": 7}, 422, "cfg", "unknown_field"),
    ("body is a list", [OK], 422, "body", "type"),
]


@pytest.mark.parametrize(("case", "body", "status", "field", "rule"), CASES, ids=[c[0] for c in CASES])
async def test_invalid_field(server: RunningServer, case: str, body: Any, status: int, field: str, rule: str) -> None:
    response = await server.client.post("/v1/generations", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["field"], error["rule"]) == (field, rule), error
    assert error["code"] == "invalid_request" and error["message"]


RAW_CASES = [
    ("malformed JSON", b'{"prompt": "a', 422, "body", "json"),
    ("empty body", b"", 422, "body", "json"),
    ("not UTF-8", b'{"prompt": "\xff\xfe"}', 422, "body", "json"),
    ("body over 4 MiB", b'{"prompt": "' + b"x" * (4 * 1024 * 1024) + b'"}', 413, "body", "max_bytes"),
]


@pytest.mark.parametrize(("case", "raw", "status", "field", "rule"), RAW_CASES, ids=[c[0] for c in RAW_CASES])
async def test_invalid_body(server: RunningServer, case: str, raw: bytes, status: int, field: str, rule: str) -> None:
    response = await server.client.post("/v1/generations", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["field"], error["rule"]) == (field, rule)


async def test_oversized_body_without_content_length_is_refused(server: RunningServer) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(80):  # 5 MiB, over the 4 MiB default
            yield b"x" * 65536
        yield b'"}'

    response = await server.client.post("/v1/generations", content=chunks())
    assert response.status_code == 413
    assert response.json()["error"]["field"] == "body"


@pytest.mark.parametrize(
    ("path", "status", "field"),
    [
        ("/v1/generations/unknown", 404, "id"),
        ("/v1/generations/unknown/images/0", 404, "id"),
        ("/v1/generations?limit=0", 422, "limit"),
        ("/v1/generations?limit=many", 422, "limit"),
        ("/v1/generations?state=sleeping", 422, "state"),
        ("/v1/generations?cursor=abc", 422, "cursor"),
        ("/v1/generations?colour=red", 422, "colour"),
    ],
)
async def test_bad_lookups(server: RunningServer, path: str, status: int, field: str) -> None:
    response = await server.client.get(path)
    assert response.status_code == status, response.text
    assert response.json()["error"]["field"] == field


async def test_unknown_route_and_method_are_json(server: RunningServer) -> None:
    missing = await server.client.get("/v2/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    wrong = await server.client.delete("/v1/generations")
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"
    assert set(wrong.headers["Allow"].split(", ")) >= {"GET", "POST"}


async def test_a_plain_get_of_the_websocket_says_to_upgrade(server: RunningServer) -> None:
    task = await submit(server.client, steps=1)
    response = await server.client.get(task["links"]["events"])
    assert response.status_code == 426 and response.headers["Upgrade"] == "websocket"
    error = response.json()["error"]
    assert error["code"] == "upgrade_required" and error["field"] == "Upgrade" and "ws://" in error["message"]


async def test_whole_numbers_written_as_floats_are_accepted(server: RunningServer) -> None:
    """JSON has one number type: 3.0 is a JSON Schema integer, and Python's json or a model's tool call may
    write it so. Fractions are still refused (CASES: steps fractional)."""
    task = await submit(server.client, steps=3.0, width=64.0, seed=7.0, guidance_scale=4)
    assert (task["request"]["steps"], task["request"]["width"], task["seeds"]) == (3, 64, [7])
    assert task["request"]["guidance_scale"] == 4.0
    await wait_for_state(server.client, task["id"])
    sheet = await server.client.post("/v1/sprite-sheets", json={"tasks": [task["id"]], "columns": 2.0})
    assert sheet.status_code == 201, sheet.text


async def test_image_index_out_of_range(server: RunningServer) -> None:
    task = await submit(server.client, steps=1)
    await wait_for_state(server.client, task["id"])
    response = await server.client.get(f"/v1/generations/{task['id']}/images/1")
    assert response.status_code == 404 and response.json()["error"]["field"] == "index"


async def test_bad_requests_lose_nothing_accepted(server: RunningServer) -> None:
    accepted = await submit(server.client, steps=2)
    for _case, body, *_ in CASES:
        await server.client.post("/v1/generations", json=body)
    assert (await wait_for_state(server.client, accepted["id"]))["state"] == "succeeded"
    listed = (await server.client.get("/v1/generations")).json()["items"]
    assert [item["id"] for item in listed] == [accepted["id"]]


@pytest.mark.anyio
async def test_a_request_over_the_work_budget_is_refused(tmp_path: Path, tiny_model: Path) -> None:
    config = server_config(tmp_path / "data", tiny_model, max_work=64 * 64 * 4 * 8)
    async for running in start_server(config):
        fits = await running.client.post("/v1/generations", json={"prompt": "x", "num_images": 4, "steps": 8})
        over = await running.client.post("/v1/generations", json={"prompt": "x", "num_images": 4, "steps": 9})
        assert fits.status_code == 202
        assert over.status_code == 422
        assert (over.json()["error"]["field"], over.json()["error"]["rule"]) == ("num_images", "budget")
        views = [{"label": f"view-{index}"} for index in range(5)]  # a sheet's images are its views
        sheet = await running.client.post("/v1/generations", json={"prompt": "x", "views": views, "steps": 8})
        assert sheet.status_code == 422
        error = sheet.json()["error"]
        assert (error["field"], error["rule"]) == ("views", "budget") and "5 images" in error["message"]


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b"plain text, not a picture", "not an image this server can read (PNG, JPEG, WebP, GIF, BMP or TIFF)"),
        (png_bytes(gradient_image(64))[:120], "damaged or truncated"),
    ],
)
async def test_an_unreadable_upload_says_what_is_wrong_with_the_file(
    server: RunningServer, data: bytes, says: str
) -> None:
    response = await server.client.post("/v1/uploads", content=data, headers={"Content-Type": "image/png"})
    error = response.json()["error"]
    assert response.status_code == 422 and says in error["message"], error
    assert "<" not in error["message"] and "0x" not in error["message"]  # no Python object in it
