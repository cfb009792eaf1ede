"""Several servers behind one address: ids name the server that made them, any server answers for every task
(relaying to its maker over HTTP and WebSocket), and API keys are copied from one server to another."""

from __future__ import annotations

import contextlib
import io
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_ws import WebSocketDisconnect, aconnect_ws
from PIL import Image

from actors.store import Store
from forge.cli import main
from forge.config import load_config
from forge.errors import ConfigError
from forge.nodes import node_of
from tests.conftest import RunningServer, server_config, start_server
from tests.helpers import gradient_image, png_bytes, square_image, submit, wait_for_state
from tests.test_store import SPEC

pytestmark = pytest.mark.anyio

SILENT_PEER = "box-c"  # listed among the peers, but nothing listens at its address
ONE_SERVER = {"X-Forge-Forwarded-From": "box-test"}  # as relayed: the answering server speaks for itself alone


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def _servers(root: Path, model: Path, **settings: Any) -> AsyncIterator[tuple[RunningServer, RunningServer]]:
    """Servers box-a and box-b, each with the same peer table (which also lists a silent box-c)."""
    ports = {"box-a": _free_port(), "box-b": _free_port(), SILENT_PEER: _free_port()}
    peers = {node: f"http://127.0.0.1:{port}" for node, port in ports.items()}
    running = []
    async with contextlib.AsyncExitStack() as stack:
        for node in ("box-a", "box-b"):
            config = server_config(root / node, model, node_id=node, peers=peers, api_port=ports[node], **settings)
            running.append(await stack.enter_async_context(contextlib.asynccontextmanager(start_server)(config)))
        yield running[0], running[1]


async def _walk(client: httpx.AsyncClient, headers: dict[str, str] | None = None, **query: Any) -> list[Any]:
    """Every page of GET /v1/generations, following next_cursor."""
    items, cursor = [], None
    while True:
        params = {**query, **({"cursor": cursor} if cursor else {})}
        page = (await client.get("/v1/generations", params=params, headers=headers)).json()
        assert page["unreachable"] == ([] if headers else [SILENT_PEER])
        items += page["items"]
        if (cursor := page["next_cursor"]) is None:
            return items


def _pixels(png: bytes) -> bytes:
    with Image.open(io.BytesIO(png)) as image:
        return image.convert("RGB").tobytes()


async def test_any_server_answers_for_the_tasks_of_every_other(tmp_path: Path, tiny_model: Path) -> None:
    async with _servers(tmp_path, tiny_model) as (a, b):
        made_on_a = await submit(a.client, seed=7)
        assert made_on_a["id"].startswith("box-a-")
        assert (await submit(b.client))["id"].startswith("box-b-")

        # Read, download and watch A's task through B.
        through_b = await wait_for_state(b.client, made_on_a["id"])
        assert through_b["state"] == "succeeded" and through_b["id"] == made_on_a["id"]
        image_url = through_b["images"][0]["url"]
        from_b, from_a = await b.client.get(image_url), await a.client.get(image_url)
        assert from_b.status_code == 200 and from_b.headers["content-type"] == "image/png"
        assert _pixels(from_b.content) == _pixels(from_a.content)

        watched = await submit(a.client, seed=8)
        async with aconnect_ws(f"{b.ws_url}/v1/generations/{watched['id']}/events", b.client) as events:
            kinds: list[str] = []
            with contextlib.suppress(WebSocketDisconnect):
                while not kinds or kinds[-1] not in {"succeeded", "failed"}:
                    kinds.append(json.loads(await events.receive_text())["type"])
        assert kinds[-1] == "succeeded" and "progress" in kinds

        # Cancel, through B, exactly the task A has queued behind a long one.
        await submit(a.client, width=512, height=512, steps=30)
        queued = await submit(a.client, seed=9)
        cancelled = await b.client.post(f"/v1/generations/{queued['id']}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
        assert (await a.client.get(f"/v1/generations/{queued['id']}")).json()["state"] == "cancelled"

        # A sprite sheet of A's tasks, asked of B, is made and kept by A; its id names A.
        sheet = await b.client.post("/v1/sprite-sheets", json={"tasks": [made_on_a["id"], watched["id"]]})
        assert sheet.status_code == 201, sheet.text
        assert sheet.json()["id"].startswith("box-a-")
        atlas = await b.client.get(sheet.json()["image"])
        assert atlas.status_code == 200 and atlas.headers["content-type"] == "image/png"
        made_on_b = await wait_for_state(b.client, (await submit(b.client))["id"])
        mixed = await b.client.post("/v1/sprite-sheets", json={"tasks": [made_on_a["id"], made_on_b["id"]]})
        assert mixed.status_code == 422 and mixed.json()["error"]["field"] == "tasks"

        # A generation guided by an image uploaded to A is made by A, whichever server it is sent to.
        png = {"content-type": "image/png"}
        upload = await a.client.post("/v1/uploads", content=png_bytes(square_image()), headers=png)
        assert upload.json()["id"].startswith("up_box-a-")
        canny = {"type": "canny", "image": upload.json()["id"]}
        guided = await b.client.post("/v1/generations", json={"prompt": "a knight", "control": canny})
        assert guided.status_code == 202 and guided.json()["id"].startswith("box-a-")
        assert (await wait_for_state(b.client, guided.json()["id"]))["state"] == "succeeded"
        on_b = await b.client.post("/v1/uploads", content=png_bytes(gradient_image()), headers=png)
        both = [canny, {"type": "depth", "image": on_b.json()["id"]}]
        split = await b.client.post("/v1/generations", json={"prompt": "a knight", "control": both})
        assert split.status_code == 422 and split.json()["error"]["field"] == "control"

        # Either server lists every task, newest first, page by page; the silent box-c is named on each page.
        walks = [await _walk(server.client, limit=3) for server in (a, b)]
        alone = [await _walk(server.client, limit=100, headers=ONE_SERVER) for server in (a, b)]
        made = sorted(alone[0] + alone[1], key=lambda item: (item["created_at"], item["id"]), reverse=True)
        assert [item["id"] for item in walks[0]] == [item["id"] for item in walks[1]] == [item["id"] for item in made]
        assert {item["id"][:5] for item in made} == {"box-a", "box-b"} and len(made) == 7
        succeeded = await _walk(b.client, limit=2, state="succeeded")
        assert [item["id"] for item in succeeded] == [item["id"] for item in made if item["state"] == "succeeded"]


async def test_ids_of_unknown_or_silent_servers_get_clear_errors(tmp_path: Path, tiny_model: Path) -> None:
    async with _servers(tmp_path, tiny_model) as (a, _):
        unknown = await a.client.get("/v1/generations/box-z-" + "0" * 32)
        assert unknown.status_code == 404
        assert "box-z" in unknown.json()["error"]["message"] and unknown.json()["error"]["field"] == "id"

        silent = await a.client.get(f"/v1/generations/{SILENT_PEER}-" + "0" * 32)
        assert silent.status_code == 502
        assert silent.json()["error"]["code"] == "peer_unreachable" and silent.json()["error"]["field"] == "id"

        async with aconnect_ws(f"{a.ws_url}/v1/generations/{SILENT_PEER}-{'0' * 32}/events", a.client) as ws:
            assert json.loads(await ws.receive_text())["error"]["code"] == "peer_unreachable"
            with pytest.raises(WebSocketDisconnect) as closed:
                await ws.receive_text()
        assert closed.value.code == 4502

        # The server still works for its own tasks.
        assert (await wait_for_state(a.client, (await submit(a.client))["id"]))["state"] == "succeeded"


async def test_keys_copied_between_servers_and_their_revocations(
    tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def keys(node: str, *args: str) -> str:
        capsys.readouterr()
        assert main(["keys", "--data-dir", str(tmp_path / node), *args]) == 0
        return capsys.readouterr().out

    token = keys("box-a", "create", "--owner", "alice").splitlines()[-1]
    export = tmp_path / "keys.json"
    export.write_text(keys("box-a", "export"))
    assert "alice" in export.read_text() and token.rsplit("_", 1)[-1] not in export.read_text()
    assert keys("box-b", "import", str(export)).startswith("1 key(s) added")

    alice = {"Authorization": f"Bearer {token}"}
    async with _servers(tmp_path, tiny_model, auth=True) as (a, b):
        on_b = await b.client.post("/v1/generations", json={"prompt": "a knight"}, headers=alice)
        assert on_b.status_code == 202
        on_a = await a.client.post("/v1/generations", json={"prompt": "a knight"}, headers=alice)
        assert (await b.client.get(f"/v1/generations/{on_a.json()['id']}", headers=alice)).status_code == 200
        stranger = await b.client.get(f"/v1/generations/{on_a.json()['id']}")
        assert stranger.status_code == 401  # A, which holds the task, refuses the relayed request

        key_id = keys("box-a", "list").split()[0]
        keys("box-a", "revoke", key_id)
        export.write_text(keys("box-a", "export"))
        assert keys("box-b", "import", str(export)).startswith("0 key(s) added, 1 revoked")
        refused = await b.client.post("/v1/generations", json={"prompt": "a knight"}, headers=alice)
        assert refused.status_code == 401


def test_a_key_id_with_another_secret_is_not_imported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "--data-dir", str(tmp_path / "a"), "create", "--owner", "alice"]) == 0
    capsys.readouterr()
    assert main(["keys", "--data-dir", str(tmp_path / "a"), "export"]) == 0
    exported = json.loads(capsys.readouterr().out)
    (tmp_path / "b").mkdir()
    (tmp_path / "keys.json").write_text(json.dumps(exported))
    assert main(["keys", "--data-dir", str(tmp_path / "b"), "import", str(tmp_path / "keys.json")]) == 0
    exported["keys"][0]["secret_hash"] = "0" * 64
    (tmp_path / "keys.json").write_text(json.dumps(exported))
    assert main(["keys", "--data-dir", str(tmp_path / "b"), "import", str(tmp_path / "keys.json")]) == 2
    assert "exists here with another secret" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("environ", "field"),
    [
        ({"FORGE_PEERS": "box-b=http://10.0.0.2:8000"}, "node_id"),
        ({"FORGE_NODE_ID": "Box_A"}, "node_id"),
        ({"FORGE_NODE_ID": "box-a", "FORGE_PEERS": "box-b=ftp://10.0.0.2"}, "peers"),
    ],
)
def test_bad_node_settings_stop_the_start(environ: dict[str, str], field: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_config(None, environ=environ)
    assert field in refused.value.message


async def test_task_ids_name_their_server_only_when_it_has_a_node_id(tmp_path: Path) -> None:
    async with (
        Store.open(tmp_path / "plain.sqlite3") as plain,
        Store.open(tmp_path / "named.sqlite3", node_id="gpu-a") as named,
    ):
        bare, prefixed = (await plain.insert(owner="o", spec=SPEC)).id, (await named.insert(owner="o", spec=SPEC)).id
    assert len(bare) == 32 and node_of(bare) is None
    assert prefixed.startswith("gpu-a-") and node_of(prefixed) == "gpu-a"
