"""The content filter: prompts with listed terms are refused before any GPU work on every interface,
evasions are normalised away without blocking innocent words, and flagged images are never stored."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engines.tiny_extras import build_tiny_image_classifier
from forge.content_filter import DEFAULT_BLOCKED_TERMS, PromptFilter
from tests.conftest import RunningServer, server_config, start_server
from tests.helpers import submit, wait_for_state
from tests.test_mcp import mcp_session

EVASIONS = [
    "a NUDE elf", "n u d e elf", "n.u.d.e elf", "n-u-d-e", "nսde elf", "nudé elf", "nüde", "nuuuude elf", "nud3",
    "S E X Y witch", "s3xy witch", "$exy", "h3nt41 girl", "ｎｕｄｅ", "NaKeD", "топлесс",
]  # fmt: skip
INNOCENT = [
    "assassin rogue", "Essex knight", "Sussex ranger", "explicitly heroic paladin", "a nudibranch familiar",
    "sextant-wielding navigator", "as the sun sets", "Middlesex archer", "analysis golem",
]  # fmt: skip


def test_evasions_are_caught_and_innocent_words_pass() -> None:
    terms = PromptFilter.from_file(DEFAULT_BLOCKED_TERMS)
    caught = [text for text in EVASIONS if terms.blocked(text)]
    wrongly = [text for text in INNOCENT if terms.blocked(text)]
    print(f"prompt filter: {len(caught)}/{len(EVASIONS)} evasions caught, {len(wrongly)} innocent prompts blocked")
    assert caught == [t for t in EVASIONS if t != "топлесс"]  # Cyrillic transliteration is a word, not a look-alike
    assert wrongly == []


def test_phrases_match_as_whole_words() -> None:
    terms = PromptFilter(["blood bath", "gore"])
    assert terms.blocked("a Blood  Bath in the arena") == "blood bath"
    assert terms.blocked("blood on the bath tiles") is None
    assert terms.blocked("Gorey details") is None and terms.blocked("g o r e") == "gore"


@pytest.mark.anyio
@pytest.mark.adapters
async def test_blocked_prompts_never_reach_the_engine(server: RunningServer) -> None:
    client = server.client
    response = await client.post("/v1/generations", json={"prompt": "a n.u.d.e elf archer"})
    assert response.status_code == 422
    error = response.json()["error"]
    assert (error["code"], error["field"], error["rule"]) == ("content_filtered", "prompt", "blocked")
    async with mcp_session(server, "streamable-http") as session:
        result = await session.call_tool("generate_character", {"prompt": "s3xy witch"})
    assert result.is_error and json.loads(result.content[0].text)["code"] == "content_filtered"  # type: ignore[union-attr]
    tasks = (await client.get("/v1/generations")).json()["items"]
    print(f"filtered prompts that reached the engine: {len(tasks)}")
    assert tasks == []
    ok = await wait_for_state(client, (await submit(client, prompt="an assassin from Essex"))["id"])
    assert ok["state"] == "succeeded"
    metrics = (await client.get("/metrics")).text
    assert 'chara_forge_rejections_total{code="content_filtered"} 1.0' in metrics


@pytest.mark.anyio
async def test_own_term_list_and_switching_off(tmp_path: Path, tiny_model: Path) -> None:
    terms = tmp_path / "terms.txt"
    terms.write_text("# house rules\nclown\n")
    async for running in start_server(server_config(tmp_path / "a", tiny_model, blocked_terms_file=str(terms))):
        assert (await running.client.post("/v1/generations", json={"prompt": "a CL0WN"})).status_code == 422
        assert (await running.client.post("/v1/generations", json={"prompt": "a nude statue"})).status_code == 202
    async for running in start_server(server_config(tmp_path / "b", tiny_model, content_filter=False)):
        assert (await running.client.post("/v1/generations", json={"prompt": "a nude statue"})).status_code == 202


@pytest.mark.anyio
async def test_flagged_images_are_not_stored_and_the_task_ends_filtered(tmp_path: Path, tiny_model: Path) -> None:
    flags = build_tiny_image_classifier(tmp_path / "flags-all", flag_everything=True)
    config = server_config(tmp_path / "data", tiny_model, image_filter_model=str(flags))
    async for running in start_server(config):
        view = await wait_for_state(running.client, (await submit(running.client, num_images=2))["id"])
        assert view["state"] == "filtered" and view["error"]["code"] == "content_filtered"
        assert "nsfw" in view["error"]["message"] and view["images"] == []
        assert not (tmp_path / "data" / "outputs" / view["id"]).exists()
        assert (await running.client.get(f"/v1/generations/{view['id']}/images/0")).status_code == 404
        metrics = (await running.client.get("/metrics")).text
        assert 'chara_forge_generations_total{state="filtered",style="none"} 1.0' in metrics

    passes = build_tiny_image_classifier(tmp_path / "flags-none", flag_everything=False)
    config = server_config(tmp_path / "data2", tiny_model, image_filter_model=str(passes))
    async for running in start_server(config):
        view = await wait_for_state(running.client, (await submit(running.client))["id"])
        assert view["state"] == "succeeded"
