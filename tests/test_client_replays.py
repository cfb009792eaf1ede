"""The request sequences Open WebUI (automatic1111 and openai engines) and SillyTavern (auto source) send,
read from their source (tests/fixtures/clients), replayed unchanged against a real server."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.conftest import RunningServer
from tests.helpers import gradient_image

pytestmark = pytest.mark.anyio

FIXTURES = Path(__file__).parent / "fixtures" / "clients"
# What the placeholders stand for on this server (auth off, as both clients' defaults send an empty Basic).
VALUES = {"{basic}": "", "{token}": "", "{model_title}": "tiny-sdxl", "{auth}": "", "{auto_url}": ""}


def _filled(value: Any) -> Any:
    if isinstance(value, str):
        for placeholder, replacement in VALUES.items():
            value = value.replace(placeholder, replacement)
        return value
    if isinstance(value, list):
        return [_filled(item) for item in value]
    if isinstance(value, dict):
        return {key: _filled(item) for key, item in value.items()}
    return value


def _headers(request: dict[str, Any]) -> dict[str, str]:
    # An HTTP server reads a field value without its trailing whitespace: "Basic " arrives as "Basic".
    return {name: _filled(value).strip() for name, value in request.get("headers", {}).items()}


def _body(request: dict[str, Any], answers: list[Any]) -> dict[str, Any]:
    if request.get("json_from"):
        source = request["json_from"]
        return {**answers[source["echo_response_of_request"]], **_filled(source["set"])}
    body = _filled(request.get("json"))
    return body if isinstance(body, dict) else {}


def _png() -> bytes:
    buffer = io.BytesIO()
    gradient_image(64).save(buffer, format="PNG")
    return buffer.getvalue()


async def _replay(client: httpx.AsyncClient, name: str, prefix: str = "") -> list[Any]:
    fixture = json.loads((FIXTURES / name).read_text())
    answers: list[Any] = []
    for index, request in enumerate(fixture["requests"]):
        path = request["path"]
        if path.startswith("{"):  # a URL taken from an earlier answer: followed below where there is one
            answers.append(None)
            continue
        method, url, headers = request["method"], prefix + path, _headers(request)
        multipart = request.get("multipart") or request.get("json", {}) if request["method"] == "POST" else None
        if isinstance(multipart, dict) and "files" in multipart:
            files = [(f["name"], (_filled(f["filename"]), _png(), f["content_type"])) for f in multipart["files"]]
            response = await client.request(
                method, url, headers=headers, data=_filled(multipart["fields"]), files=files
            )
        elif method == "POST":
            response = await client.request(method, url, headers=headers, json=_body(request, answers))
        else:
            response = await client.request(method, url, headers=headers)
        assert response.status_code == 200, (name, index, path, response.text)
        assert response.headers["content-type"].startswith("application/json"), (name, index)
        answers.append(response.json())
    return answers


def _decodes_as_png(text: str) -> None:
    assert not text.startswith("data:")
    with Image.open(io.BytesIO(base64.b64decode(text))) as image:
        assert image.format == "PNG"


async def test_open_webui_automatic1111_session(server: RunningServer) -> None:
    answers = await _replay(server.client, "open_webui_automatic1111.json")
    assert any(model["title"] == "tiny-sdxl" for model in answers[1])
    generated = answers[-1]
    _decodes_as_png(generated["images"][0])
    assert json.loads(generated["info"])["width"] == 512


async def test_open_webui_with_a_trailing_slash_base_url(server: RunningServer) -> None:
    response = await server.client.get(f"{server.base_url}//sdapi/v1/options", headers={"authorization": "Basic"})
    assert response.status_code == 200 and response.json()["sd_model_checkpoint"] == "tiny-sdxl"


async def test_sillytavern_auto_session(server: RunningServer) -> None:
    answers = await _replay(server.client, "sillytavern_auto.json")
    progress = answers[9]
    assert progress["progress"] == 0 and progress["state"]["job_count"] == 0  # idle: it may generate
    assert [entry["name"] for entry in answers[1]] and isinstance(answers[7], list)
    _decodes_as_png(answers[10]["images"][0])


async def test_open_webui_openai_session(server: RunningServer) -> None:
    answers = await _replay(server.client, "open_webui_openai.json", prefix="/openai/v1")
    _decodes_as_png(answers[0]["data"][0]["b64_json"])
    _decodes_as_png(answers[2]["data"][0]["b64_json"])
