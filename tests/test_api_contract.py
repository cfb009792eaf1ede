"""The REST API against its own OpenAPI document. schemathesis generates requests from /openapi.json, valid
and invalid, sends them to a real server and checks every answer against the document: documented status
codes and content types, response bodies that match their schemas, no 5xx, invalid input refused with a 4xx
and valid input accepted (tests/contract/schemathesis.toml lists the few exceptions a schema cannot express)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import anyio
import pytest
from starlette.routing import Route

from protocols.openapi import openapi_spec
from protocols.views import API
from tests.conftest import server_config, start_server

pytestmark = pytest.mark.anyio

SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
CONFIG = Path(__file__).parent / "contract" / "schemathesis.toml"


async def test_every_answer_matches_the_api_document(tmp_path: Path, tiny_model: Path) -> None:
    # One torch thread for the generations the generated requests queue, so the server keeps answering, and a
    # small work budget, so no generated request (a sheet of 16 views at 512² and 100 steps, or an animation of
    # 96 frames, say) holds the engine past schemathesis' timeouts for the calls that wait for it.
    config = server_config(tmp_path / "data", tiny_model, cpu_threads=1, max_work=64 * 64 * 4 * 20)
    async for server in start_server(config):
        command = [
            str(SCHEMATHESIS), "--no-color", "--config-file", str(CONFIG), "run", f"{server.base_url}/openapi.json",
            "--checks", "all", "--max-examples", "25", "--seed", "1", "--generation-deterministic",
            # A1111 and OpenAI calls answer once their task has run, behind whatever else is queued.
            "--request-timeout", "120", "--max-response-time", "120",
            # The events endpoint speaks WebSocket; its plain-GET answer is tested in test_bad_input.
            "--exclude-path", f"{API}/{{id}}/events",
        ]  # fmt: skip
        result = await anyio.run_process(command, check=False, cwd=tmp_path)  # its cache goes there
        report = result.stdout.decode(errors="replace") + result.stderr.decode(errors="replace")
        assert result.returncode == 0, report[-12000:]
        generated = re.search(r"(\d+) generated, (\d+) passed", report)
        assert generated and int(generated[1]) == int(generated[2]) > 500, report[-4000:]
        operations = (await server.client.get("/openapi.json")).json()["paths"]
        assert sum(len(methods) for methods in operations.values()) >= 24


async def test_a_route_missing_from_the_document_stops_the_server() -> None:
    async def hidden(request: object) -> None:
        raise AssertionError

    with pytest.raises(RuntimeError, match=r"undocumented \[\('get', '/v1/hidden'\)\]"):
        openapi_spec([Route("/v1/hidden", hidden, methods=["GET"])])
