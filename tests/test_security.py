"""Identity and limits with auth on: JWTs and API keys, owners isolated on every interface, per-plan
rate limits shared by every interface. Each test prints its figures."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import httpx
import httpx2
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from gradio_client import Client
from httpx_ws import WebSocketDisconnect, aconnect_ws
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client

from actors.keys import KeyStore, SqliteKeys
from actors.supervisor import check_exposure
from forge.cli import main
from forge.config import load_config
from forge.errors import ConfigError
from tests.conftest import ADAPTERS, RunningServer, server_config, start_server
from tests.helpers import wait_for_state

pytestmark = [pytest.mark.anyio, pytest.mark.adapters]

SECRET = "a-test-secret-of-enough-length-for-hs256!"
METRICS_TOKEN = "a-scraper-token"
ISSUER = "https://id.example"
PLANS = {
    "free": {"requests": 3, "window_s": 3600, "max_queued": 0},
    "premium": {"requests": 100, "window_s": 3600, "max_queued": 0},
    "unlimited": {},
}


class Keys:
    def __init__(self, store: KeyStore) -> None:
        self.store = store
        self.tokens: dict[str, str] = {}
        for owner, plan, scopes in (("alice", "free", []), ("bob", "premium", []), ("carol", "free", []),
                                    ("dave", "free", []), ("frank", "free", []),
                                    ("root", "unlimited", ["admin"])):  # fmt: skip
            self.tokens[owner] = store.create(owner, plan, ["generate", *scopes])[1]

    def headers(self, owner: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[owner]}"}


@pytest.fixture
async def secure(tmp_path: Path, tiny_model: Path) -> AsyncIterator[tuple[RunningServer, Keys]]:
    data = tmp_path / "data"
    keys = Keys(KeyStore(SqliteKeys(data / "forge.sqlite3")))
    config = server_config(
        data,
        tiny_model,
        auth=True,
        jwt_secret=SECRET,
        jwt_issuer=ISSUER,
        plans=PLANS,
        metrics_token=METRICS_TOKEN,
        **ADAPTERS,
    )
    async for running in start_server(config):
        yield running, keys


def _token(**changes: Any) -> str:
    claims = {"sub": "erin", "aud": "chara-forge", "iss": ISSUER, "exp": int(time.time()) + 600, "plan": "premium"}
    key, algorithm = changes.pop("key", SECRET), changes.pop("algorithm", "HS256")
    claims.update(changes)
    return jwt.encode({k: v for k, v in claims.items() if v is not None}, key, algorithm=algorithm)


def _unsigned(claims: dict[str, Any]) -> str:
    import base64

    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}."


async def test_tokens_and_keys(secure: tuple[RunningServer, Keys]) -> None:
    server, keys = secure
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = {
        "wrong signature": _token(key="another-secret-of-enough-length-for-hs256"),
        "alg none": _unsigned({"sub": "erin", "aud": "chara-forge", "iss": ISSUER, "exp": int(time.time()) + 600}),
        "expired": _token(exp=int(time.time()) - 60),
        "wrong audience": _token(aud="someone-else"),
        "wrong issuer": _token(iss="https://evil.example"),
        "no expiry": _token(exp=None),
        "RS256 from an unknown key": _token(key=rsa_key, algorithm="RS256"),
        "garbage": "not.a.token",
        "unknown API key": "cf_0123456789abcdef_nothing",
    }
    revoked = keys.store.create("mallory", "free", ["generate"])
    keys.store.revoke(revoked[0].id)
    forged["revoked API key"] = revoked[1]
    accepted = []
    for name, token in forged.items():
        response = await server.client.get("/v1/generations", headers={"Authorization": f"Bearer {token}"})
        if response.status_code != 401:
            accepted.append(name)
        assert response.json()["error"]["code"] == "unauthorized"
    no_header = await server.client.get("/v1/generations")
    print(f"forged, expired, wrong-audience or revoked credentials accepted: {len(accepted)} of {len(forged)}")
    assert accepted == [] and no_header.status_code == 401
    ok = await server.client.get("/v1/generations", headers={"Authorization": f"Bearer {_token()}"})
    assert ok.status_code == 200
    assert (await server.client.get("/v1/generations", headers=keys.headers("bob"))).status_code == 200


async def test_with_auth_on_only_probes_and_api_docs_answer_strangers(secure: tuple[RunningServer, Keys]) -> None:
    """The catalog shows where LoRAs, upscalers and models lie on the server's disk: callers only. /metrics
    asks for its own token."""
    server, keys = secure
    document = (await server.client.get("/openapi.json")).json()
    open_paths = {"/healthz", "/readyz", "/openapi.json", "/docs"}
    # The document lists every route (the server will not start otherwise), so no route is open unnoticed.
    unguarded = {
        path
        for path, methods in document["paths"].items()
        if any("401" not in operation["responses"] for operation in methods.values())
    }
    assert unguarded == open_paths
    guarded = sorted(
        path.replace("{name}", "standing").replace("{id}", "tiny-sdxl")
        for path, methods in document["paths"].items()
        if "get" in methods and "401" in methods["get"]["responses"] and "{id}/" not in path and path != "/metrics"
    )
    assert {"/v1/info", "/v1/styles", "/v1/loras", "/v1/poses", "/v1/models", "/v1/postprocess"} <= set(guarded)
    for path in guarded:
        stranger = await server.client.get(path)
        error = stranger.json()["error"]
        assert stranger.status_code == 401 and error.get("field", error.get("param")) == "Authorization", path
        assert (await server.client.get(path, headers=keys.headers("bob"))).status_code in (200, 404), path
    for path in open_paths:
        assert (await server.client.get(path)).status_code == 200, path
    scrapes = [
        (await server.client.get("/metrics", headers=headers)).status_code
        for headers in ({}, keys.headers("root"), {"Authorization": f"Bearer {METRICS_TOKEN}"})
    ]
    assert scrapes == [401, 403, 200]  # a caller's key, even an admin's, is not the scraper's token


async def test_an_rsa_key_server_refuses_hmac_tokens_made_with_its_public_key(tmp_path: Path, tiny_model: Path) -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (tmp_path / "jwt.pem").write_bytes(public_pem)
    config = server_config(tmp_path / "data", tiny_model, auth=True, jwt_public_key_file=str(tmp_path / "jwt.pem"))
    claims = {"sub": "erin", "aud": "chara-forge", "exp": int(time.time()) + 600}
    confused = _hmac_with(public_pem, claims)
    async for running in start_server(config):
        good = jwt.encode(claims, private, algorithm="RS256")
        assert (
            await running.client.get("/v1/generations", headers={"Authorization": f"Bearer {good}"})
        ).status_code == 200
        bad = await running.client.get("/v1/generations", headers={"Authorization": f"Bearer {confused}"})
        assert bad.status_code == 401


def _hmac_with(secret: bytes, claims: dict[str, Any]) -> str:
    """An HS256 token keyed with the server's public key, built by hand (PyJWT itself refuses to)."""
    import base64
    import hashlib
    import hmac

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing = f"{b64(json.dumps({'alg': 'HS256', 'typ': 'JWT'}).encode())}.{b64(json.dumps(claims).encode())}"
    return f"{signing}.{b64(hmac.new(secret, signing.encode(), hashlib.sha256).digest())}"


async def _mcp(server: RunningServer, token: str) -> AsyncIterator[ClientSession]:
    url = f"http://127.0.0.1:{server.handle.mcp_port}/mcp"
    async with (
        httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=30) as http,
        streamable_http_client(url, http_client=http) as streams,
        ClientSession(streams[0], streams[1]) as session,
    ):
        await session.initialize()
        yield session


async def test_owners_see_only_their_own_tasks_on_every_interface(secure: tuple[RunningServer, Keys]) -> None:
    server, keys = secure
    client = server.client
    created = await client.post("/v1/generations", json={"prompt": "alice's knight"}, headers=keys.headers("alice"))
    task_id = created.json()["id"]
    async with httpx.AsyncClient(base_url=server.base_url, headers=keys.headers("alice"), timeout=30) as alice:
        assert (await wait_for_state(alice, task_id))["state"] == "succeeded"
    bob = keys.headers("bob")
    attempts: dict[str, bool] = {}
    attempts["REST get"] = (await client.get(f"/v1/generations/{task_id}", headers=bob)).status_code == 200
    attempts["REST image"] = (await client.get(f"/v1/generations/{task_id}/images/0", headers=bob)).status_code == 200
    attempts["REST cancel"] = (await client.post(f"/v1/generations/{task_id}/cancel", headers=bob)).status_code < 400
    listing = (await client.get("/v1/generations", headers=bob)).json()["items"]
    attempts["REST list"] = any(item["id"] == task_id for item in listing)
    sheet = await client.post("/v1/sprite-sheets", json={"tasks": [task_id]}, headers=bob)
    attempts["REST sprite sheet"] = sheet.status_code == 201
    url = f"{server.ws_url}/v1/generations/{task_id}/events?access_token={keys.tokens['bob']}"
    async with aconnect_ws(url, client) as ws:
        first = json.loads(await ws.receive_text())
    attempts["WebSocket events"] = first.get("type") == "succeeded"
    async for session in _mcp(server, keys.tokens["bob"]):
        got = await session.call_tool("get_generation", {"id": task_id})
        attempts["MCP get"] = not got.is_error
        cancelled = await session.call_tool("cancel_generation", {"id": task_id})
        attempts["MCP cancel"] = not cancelled.is_error
        try:
            await session.read_resource(f"chara-forge://generations/{task_id}/images/0")  # type: ignore[arg-type]
            attempts["MCP resource"] = True
        except Exception:
            attempts["MCP resource"] = False
    ui = await anyio.to_thread.run_sync(
        lambda: Client(f"http://127.0.0.1:{server.handle.ui_port}/", auth=("bob", keys.tokens["bob"]), verbose=False)
    )
    history = await anyio.to_thread.run_sync(lambda: ui.predict(api_name="/history"))
    attempts["UI history"] = bool(history)
    try:
        await anyio.to_thread.run_sync(lambda: ui.predict(task_id, api_name="/reuse"))
        attempts["UI reuse"] = True
    except Exception:
        attempts["UI reuse"] = False
    outputs = server.handle.config.outputs_path
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.handle.ui_port}", timeout=30) as browser:
        login = await browser.post("/login", data={"username": "bob", "password": keys.tokens["bob"]})
        assert login.status_code == 200
        for prefix in ("/gradio_api/file=", "/file="):
            probe = await browser.get(f"{prefix}{outputs / task_id / '0.png'}")
            attempts[f"UI {prefix} path"] = probe.status_code == 200 and probe.content.startswith(b"\x89PNG")
    allowed = [name for name, worked in attempts.items() if worked]
    print(f"cross-owner reads attempted: {len(attempts)}, allowed: {len(allowed)} {allowed}")
    assert allowed == []
    assert (await client.get(f"/v1/generations/{task_id}", headers=keys.headers("root"))).status_code == 200
    assert (await client.get(f"/v1/generations/{task_id}", headers=keys.headers("alice"))).status_code == 200
    with pytest.raises(ValueError, match="Could not login"):  # another owner's key is no password for bob
        await anyio.to_thread.run_sync(
            lambda: Client(f"http://127.0.0.1:{server.handle.ui_port}/", auth=("bob", keys.tokens["alice"]))
        )


async def test_rate_limits_are_exact_and_shared_across_interfaces(secure: tuple[RunningServer, Keys]) -> None:
    server, keys = secure
    client = server.client
    statuses = [
        (await client.post("/v1/generations", json={"prompt": f"r{i}", "steps": 1}, headers=keys.headers("alice")))
        for i in range(5)
    ]
    codes = [r.status_code for r in statuses]
    assert codes == [202, 202, 202, 429, 429]
    assert int(statuses[3].headers["retry-after"]) > 3500 and statuses[3].json()["error"]["code"] == "rate_limited"
    mcp_results = []
    async for session in _mcp(server, keys.tokens["carol"]):
        for i in range(5):
            result = await session.call_tool("generate_character", {"prompt": f"m{i}", "wait": False})
            mcp_results.append(not result.is_error)
            if result.is_error:
                assert json.loads(result.content[0].text)["code"] == "rate_limited"  # type: ignore[union-attr]
    shared = [
        (
            await client.post("/v1/generations", json={"prompt": "d", "steps": 1}, headers=keys.headers("dave"))
        ).status_code
        for _ in range(2)
    ]
    async for session in _mcp(server, keys.tokens["dave"]):
        for _ in range(3):
            shared.append(
                202
                if not (await session.call_tool("generate_character", {"prompt": "d", "wait": False})).is_error
                else 429
            )
    ui = await anyio.to_thread.run_sync(
        lambda: Client(f"http://127.0.0.1:{server.handle.ui_port}/", auth=("frank", keys.tokens["frank"]))
    )
    ui_accepted = 0
    for i in range(5):
        try:
            await anyio.to_thread.run_sync(partial(ui.predict, *_ui_inputs(f"u{i}"), api_name="/generate"))
            ui_accepted += 1
        except Exception as exc:  # gradio_client re-raises the UI's message
            assert "allows 3 generations" in str(exc)
    print(f"rate limit 3/h, 5 tries: REST accepted {codes.count(202)}, MCP accepted {sum(mcp_results)}, "
          f"UI accepted {ui_accepted}, REST+MCP accepted {shared.count(202)}")  # fmt: skip
    assert sum(mcp_results) == 3 and shared.count(202) == 3 and ui_accepted == 3
    scrape = await client.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert 'chara_forge_rejections_total{code="rate_limited"}' in scrape.text


def _ui_inputs(prompt: str) -> list[Any]:
    from tests.test_ui import DEFAULTS

    return list({**DEFAULTS, "prompt": prompt, "steps": 1}.values())


async def test_websocket_origin_is_checked(secure: tuple[RunningServer, Keys]) -> None:
    server, keys = secure
    task = (await server.client.post("/v1/generations", json={"prompt": "x"}, headers=keys.headers("bob"))).json()
    url = f"{server.ws_url}/v1/generations/{task['id']}/events?access_token={keys.tokens['bob']}"
    async with aconnect_ws(url, server.client, headers={"Origin": "https://evil.example"}) as ws:
        refused = json.loads(await ws.receive_text())
        with pytest.raises(WebSocketDisconnect):
            await ws.receive_text()
    assert refused["error"]["field"] == "Origin"
    async with aconnect_ws(f"{server.ws_url}/v1/generations/{task['id']}/events", server.client) as ws:
        assert json.loads(await ws.receive_text())["error"]["code"] == "unauthorized"


def test_without_auth_the_server_stays_on_loopback() -> None:
    with pytest.raises(ConfigError, match="auth off"):
        check_exposure(load_config(None, environ={}, overrides={"host": "0.0.0.0"}))
    check_exposure(load_config(None, environ={}, overrides={"host": "0.0.0.0", "auth": True}))
    check_exposure(load_config(None, environ={}, overrides={"host": "127.0.0.1"}))


def test_keys_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = str(tmp_path / "data")
    assert main(["keys", "--data-dir", data, "create", "--owner", "zoe", "--plan", "premium", "--scope", "admin"]) == 0
    token = capsys.readouterr().out.strip().splitlines()[-1]
    store = KeyStore(SqliteKeys(tmp_path / "data" / "forge.sqlite3"))
    found = store.verify(token)
    assert found is not None and found.owner == "zoe" and found.scopes == ["admin", "generate"]
    assert main(["keys", "--data-dir", data, "list"]) == 0
    assert "zoe" in capsys.readouterr().out
    assert main(["keys", "--data-dir", data, "revoke", found.id]) == 0
    assert store.verify(token) is None
    assert main(["keys", "--data-dir", data, "revoke", found.id]) == 1
    assert main(["keys", "--data-dir", data, "create", "--owner", "x", "--plan", "gold"]) == 2


def test_plans_limit_tasks_in_flight_and_refuse_unknown_plans() -> None:
    from actors.rate_limits import RateLimited, RateLimiter
    from forge.auth import Plan

    limiter = RateLimiter()
    small = Plan(requests=0, max_queued=2)
    limiter.admit("ann", "small", small, in_flight=0)
    limiter.admit("ann", "small", small, in_flight=1)
    with pytest.raises(RateLimited) as refused:
        limiter.admit("ann", "small", small, in_flight=2)
    assert refused.value.retry_after_s > 0 and "2 generations queued or running" in refused.value.message


async def test_characters_are_isolated_over_mcp(secure: tuple[RunningServer, Keys]) -> None:
    server, keys = secure
    created = await server.client.post(
        "/v1/characters", json={"name": "ayla", "description": "Ayla"}, headers=keys.headers("alice")
    )
    ayla = created.json()["id"]
    async for session in _mcp(server, keys.tokens["bob"]):
        listed = await session.call_tool("list_characters", {})
        used = await session.call_tool("generate_character", {"prompt": "x", "character": ayla, "wait": False})
        sheet = await session.call_tool("character_sheet", {"character": ayla, "wait": False})
    assert json.loads(listed.content[0].text) == []  # type: ignore[union-attr]
    for result in (used, sheet):
        assert result.is_error and json.loads(result.content[0].text)["code"] == "not_found"  # type: ignore[union-attr]
    assert (await server.client.get("/v1/generations", headers=keys.headers("bob"))).json()["items"] == []
