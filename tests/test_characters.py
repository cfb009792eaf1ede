"""The character library over REST and MCP: versions, owners, and generations that use a character."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from actors.encoding import read_parameters
from actors.keys import KeyStore, SqliteKeys
from tests.conftest import RunningServer, server_config, start_server
from tests.helpers import generate_pixels, gradient_image, submit, wait_for_state
from tests.test_image_edit import b64

pytestmark = pytest.mark.anyio

HERO = {
    "name": "ayla",
    "description": "Ayla, a red-haired ranger with a green cloak",
    "defaults": {"negative_prompt": "blurry", "seed": 77},
}


async def test_a_character_is_made_changed_used_and_deleted(server: RunningServer) -> None:
    client = server.client
    created = await client.post("/v1/characters", json={**HERO, "references": [b64(gradient_image(64))]})
    assert created.status_code == 201, created.text
    hero = created.json()
    assert hero["version"] == 1 and hero["references"][0].startswith("up_") and hero["id"].startswith("ch_")
    assert created.headers["Location"] == f"/v1/characters/{hero['id']}"
    assert (await client.post("/v1/characters", json=HERO)).json()["error"]["field"] == "name"  # 409: taken

    view, _ = await generate_pixels(client, prompt="drawing a bow", character="ayla", steps=2)
    request = view["request"]
    assert request["prompt"] == "Ayla, a red-haired ranger with a green cloak, drawing a bow"
    assert request["negative_prompt"] == "blurry" and request["seed"] == 77
    assert request["character"] == {"id": hero["id"], "name": "ayla", "version": 1}
    image = await client.get(view["images"][0]["url"])
    with Image.open(io.BytesIO(image.content)) as png:
        assert "Character: ayla (v1)" in (read_parameters(png) or "")
    own_seed = (await submit(client, prompt="x", character=hero["id"], seed=5, steps=2))["request"]["seed"]
    assert own_seed == 5  # the request's own fields win

    changed = await client.patch(f"/v1/characters/{hero['id']}", json={"description": "Ayla in winter furs"})
    assert changed.status_code == 200 and changed.json()["version"] == 2
    again = (await submit(client, prompt="resting", character="ayla", steps=2))["request"]
    assert again["character"]["version"] == 2 and again["prompt"].startswith("Ayla in winter furs")
    assert [c["name"] for c in (await client.get("/v1/characters")).json()["items"]] == ["ayla"]

    assert (await client.delete(f"/v1/characters/{hero['id']}")).status_code == 204
    assert (await client.get(f"/v1/characters/{hero['id']}")).status_code == 404
    refused = await client.post("/v1/generations", json={"prompt": "x", "character": "ayla"})
    assert refused.status_code == 404 and refused.json()["error"]["field"] == "character"
    # A generation that used it keeps its record.
    assert (await client.get(f"/v1/generations/{view['id']}")).json()["request"]["character"]["name"] == "ayla"


async def test_a_turnaround_sheet_is_one_task_of_four_views_and_a_sprite_sheet(server: RunningServer) -> None:
    client = server.client
    hero = (await client.post("/v1/characters", json={**HERO, "references": [b64(gradient_image(64))]})).json()
    response = await client.post(f"/v1/characters/{hero['id']}/sheets", json={"kind": "turnaround", "steps": 2})
    assert response.status_code == 202, response.text
    view = await wait_for_state(client, response.json()["id"])
    assert view["state"] == "succeeded", view["error"]
    assert response.headers["Location"] == f"/v1/generations/{view['id']}"
    request = view["request"]
    assert request["character"]["name"] == "ayla" and len(request["references"]) == 1
    assert [v["label"] for v in request["views"]] == ["front", "three-quarter", "side", "back"]
    assert len(view["images"]) == 4 and len(set(view["seeds"])) == 1  # one seed for every view
    atlas = (await client.get(f"/v1/generations/{view['id']}/sprite-sheet.json")).json()
    assert sorted(atlas["frames"]) == sorted(
        f"{view['id']}/{label}" for label in ("front", "three-quarter", "side", "back")
    )
    first = await client.get(view["images"][0]["url"])
    with Image.open(io.BytesIO(first.content)) as png:
        parameters = read_parameters(png) or ""
    assert "front view" in parameters and "View: front (openpose pose front)" in parameters
    assert "Character: ayla (v1)" in parameters

    expressions = await client.post(f"/v1/characters/{hero['id']}/sheets", json={"kind": "expressions", "steps": 2})
    done = await wait_for_state(client, expressions.json()["id"])
    assert [v["label"] for v in done["request"]["views"]] == ["neutral", "happy", "angry", "sad", "surprised"]
    assert len(done["images"]) == 5 and done["request"]["control"] == []
    refused = await client.post(f"/v1/characters/{hero['id']}/sheets", json={"kind": "poses"})
    assert refused.status_code == 422 and refused.json()["error"]["field"] == "poses"
    unknown = await client.post(f"/v1/characters/{hero['id']}/sheets", json={"kind": "poses", "poses": ["moonwalk"]})
    assert unknown.status_code == 422 and unknown.json()["error"]["field"] == "views[0].pose"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({**HERO, "references": ["bm90IGFuIGltYWdl"]}, "references[0]"),
        ({**HERO, "references": [b64(gradient_image(8))] * 5}, "references"),
        ({**HERO, "name": "no spaces allowed"}, "name"),
        ({"name": "x"}, "description"),
        ({**HERO, "defaults": {"reference_strength": 2}}, "defaults.reference_strength"),
    ],
)
async def test_bad_characters_are_refused_naming_the_field(
    server: RunningServer, body: dict[str, Any], field: str
) -> None:
    response = await server.client.post("/v1/characters", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == field


@pytest.fixture
async def owners(tmp_path: Path, tiny_model: Path) -> AsyncIterator[tuple[RunningServer, dict[str, str]]]:
    """A server with auth on, and a key each for alice, bob and root (an admin)."""
    data = tmp_path / "data"
    keys = KeyStore(SqliteKeys(data / "forge.sqlite3"))
    tokens = {
        owner: keys.create(owner, "unlimited", ["generate", *scopes])[1]
        for owner, scopes in (("alice", []), ("bob", []), ("root", ["admin"]))
    }
    async for running in start_server(server_config(data, tiny_model, auth=True)):
        yield running, tokens


async def test_characters_belong_to_their_owner(owners: tuple[RunningServer, dict[str, str]]) -> None:
    server, tokens = owners

    def client(owner: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=server.base_url, headers={"Authorization": f"Bearer {tokens[owner]}"})

    async with client("alice") as alice, client("bob") as bob, client("root") as root:
        mine = (await alice.post("/v1/characters", json=HERO)).json()
        assert (await bob.post("/v1/characters", json=HERO)).status_code == 201  # names are per owner
        assert (await bob.get(f"/v1/characters/{mine['id']}")).status_code == 404
        assert (await bob.patch(f"/v1/characters/{mine['id']}", json={"name": "stolen"})).status_code == 404
        assert (await bob.delete(f"/v1/characters/{mine['id']}")).status_code == 404
        refused = await bob.post("/v1/generations", json={"prompt": "x", "character": mine["id"]})
        assert refused.status_code == 404 and refused.json()["error"]["field"] == "character"
        bobs = (await bob.post("/v1/generations", json={"prompt": "x", "character": "ayla", "steps": 2})).json()
        assert bobs["request"]["character"]["id"] != mine["id"]  # by name: bob's own ayla
        assert len((await alice.get("/v1/characters")).json()["items"]) == 1
        assert len((await root.get("/v1/characters")).json()["items"]) == 2  # an admin sees all
        assert (await bob.post(f"/v1/characters/{mine['id']}/sheets", json={})).status_code == 404
