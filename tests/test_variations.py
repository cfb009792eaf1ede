"""Prompt variations ({a|b} and __wildcard__ files, random or combinatorial) and the prompt matrix (`grid`):
each image records the prompt and settings it got, and is the image a plain request for them gives."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from actors.encoding import read_parameters
from forge.infotext import parse_infotext
from tests.conftest import RunningServer, server_config, start_server
from tests.helpers import submit, wait_for_state

pytestmark = pytest.mark.anyio

SMALL = {"width": 64, "height": 64, "steps": 3}
TOLERANCE = 4  # a batch row against the same image made alone (the UNet's batch-size dependent rounding)


@pytest.fixture
async def wildcard_server(tmp_path: Path, tiny_model: Path) -> AsyncIterator[RunningServer]:
    """A server with two wildcard files (one in a folder) and no result cache."""
    folder = tmp_path / "data" / "wildcards"
    (folder / "armour").mkdir(parents=True)
    (folder / "colours.txt").write_text("# one choice per line\ncrimson\ncobalt\nemerald\n")
    (folder / "armour" / "metal.txt").write_text("iron\nbronze\n")
    config = server_config(tmp_path / "data", tiny_model, result_cache=False)
    async for running in start_server(config):
        yield running


async def finished(server: RunningServer, **fields: Any) -> dict[str, Any]:
    task = await submit(server.client, **{**SMALL, **fields})
    view = await wait_for_state(server.client, task["id"])
    assert view["state"] == "succeeded", view["error"]
    return view


async def image_of(server: RunningServer, url: str) -> Image.Image:
    with Image.open(io.BytesIO((await server.client.get(url)).content)) as image:
        image.load()
        return image


async def infotexts(server: RunningServer, view: dict[str, Any]) -> list[tuple[str, str, dict[str, str]]]:
    texts = []
    for link in view["images"]:
        texts.append(parse_infotext(read_parameters(await image_of(server, link["url"])) or ""))
    return texts


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


async def test_combinatorial_covers_every_choice_and_each_image_records_its_prompt(
    wildcard_server: RunningServer,
) -> None:
    server = wildcard_server
    view = await finished(server, prompt="{red|blue|green} knight", variations="combinatorial", num_images=3, seed=5)
    prompts = [image["prompt"] for image in view["images"]]
    assert prompts == ["red knight", "blue knight", "green knight"]
    assert [image["seed"] for image in view["images"]] == [5, 6, 7]
    for prompt, (text, _, params) in zip(prompts, await infotexts(server, view), strict=True):
        assert text == prompt and params["Template"] == "{red|blue|green} knight"
    metadata_url = f"/v1/generations/{view['id']}"
    stored = json.loads((await server.client.get(metadata_url)).content)
    assert stored["request"]["prompt"] == "{red|blue|green} knight"
    assert [variant["prompt"] for variant in stored["request"]["variants"]] == prompts

    # Each image is the image a plain request for its prompt and seed gives.
    for index, prompt in enumerate(prompts):
        alone = await finished(server, prompt=prompt, seed=5 + index)
        assert "variants" not in alone["request"] or not alone["request"]["variants"]
        got = pixels(await image_of(server, view["images"][index]["url"]))
        want = pixels(await image_of(server, alone["images"][0]["url"]))
        assert np.abs(got - want).max() <= TOLERANCE


async def test_random_choices_follow_each_image_seed_and_wildcard_files(wildcard_server: RunningServer) -> None:
    server = wildcard_server
    template = "a __colours__ knight in __armour/metal__ plate, {tall|short}"
    first = await finished(server, prompt=template, num_images=4, seed=40, steps=1)
    again = await finished(server, prompt=template, num_images=4, seed=40, steps=1)
    prompts = [image["prompt"] for image in first["images"]]
    assert prompts == [image["prompt"] for image in again["images"]]  # the same seed picks the same prompts
    for prompt in prompts:
        words = prompt.split()
        assert words[1] in {"crimson", "cobalt", "emerald"} and words[4] in {"iron", "bronze"}
        assert prompt.endswith((", tall", ", short"))
    # Image k's choices are its own seed's: the request that starts at that seed picks them for its first image.
    later = await finished(server, prompt=template, num_images=1, seed=42, steps=1)
    assert later["images"][0]["prompt"] == prompts[2]
    listed = (await server.client.get("/v1/wildcards")).json()
    assert listed["items"] == [{"name": "armour/metal", "choices": 2}, {"name": "colours", "choices": 3}]
    assert listed["directory"].endswith("wildcards")
    # Off: the prompt as written (braces and all) for every image.
    literal = await finished(server, prompt="a {red|blue} knight", variations="off", num_images=2, steps=1)
    assert all(image["prompt"] is None for image in literal["images"])
    assert (await infotexts(server, literal))[0][0] == "a {red|blue} knight"


async def test_a_missing_wildcard_or_a_broken_variation_is_refused_naming_the_prompt(
    wildcard_server: RunningServer,
) -> None:
    client = wildcard_server.client
    for prompt, words in (("a __dragons__ knight", "dragons.txt"), ("a {red|blue} {knight", "does not parse")):
        answer = await client.post("/v1/generations", json={"prompt": prompt, **SMALL})
        assert answer.status_code == 422, answer.text
        error = answer.json()["error"]
        assert error["field"] == "prompt" and words in error["message"]
    answer = await client.post("/v1/generations", json={"prompt": "x", "negative_prompt": "__nothing__", **SMALL})
    assert answer.status_code == 422 and answer.json()["error"]["field"] == "negative_prompt"


async def test_a_prompt_matrix_is_one_task_with_each_cell_and_a_labelled_grid(wildcard_server: RunningServer) -> None:
    server = wildcard_server
    grid = {"x": {"field": "prompt", "values": ["red", "blue"]}, "y": {"field": "steps", "values": [2, 3]}}
    view = await finished(server, prompt="a red knight", seed=9, grid=grid)
    assert [image["prompt"] for image in view["images"]] == ["a red knight", "a blue knight"] * 2
    texts = await infotexts(server, view)
    assert [params["Steps"] for _, _, params in texts] == ["2", "2", "3", "3"]
    assert {params["Seed"] for _, _, params in texts} == {"9"}
    assert all("Template" not in params for _, _, params in texts)

    cells = [(prompt, steps) for steps in (2, 3) for prompt in ("a red knight", "a blue knight")]
    for index, (prompt, steps) in enumerate(cells):
        alone = await finished(server, prompt=prompt, seed=9, steps=steps)
        got = pixels(await image_of(server, view["images"][index]["url"]))
        want = pixels(await image_of(server, alone["images"][0]["url"]))
        assert np.abs(got - want).max() <= TOLERANCE, (prompt, steps)

    # The grid: a header row of x labels, a label column for y, and the four cells in place.
    picture = await image_of(server, view["grid"])
    header, label = picture.height - 2 * 64, picture.width - 2 * 64
    assert header > 0 and label == 64
    first_cell = picture.crop((label, header, label + 64, header + 64))
    assert np.abs(pixels(first_cell) - pixels(await image_of(server, view["images"][0]["url"]))).max() == 0
    labels = np.asarray(picture.convert("L").crop((0, 0, picture.width, header)))
    assert labels.min() < 128  # some ink in the header


async def test_bad_grids_are_refused_naming_the_value(wildcard_server: RunningServer) -> None:
    client = wildcard_server.client
    cases = [
        ({"x": {"field": "prompt", "values": ["green", "blue"]}}, {}, "grid.x.values[0]"),
        ({"x": {"field": "steps", "values": [2, 0]}}, {}, "grid.x.values[1]"),
        ({"x": {"field": "scheduler", "values": ["euler", "dpm-fancy"]}}, {}, "grid.x.values[1]"),
        ({"x": {"field": "seed", "values": [1]}, "y": {"field": "seed", "values": [2]}}, {}, "grid.y.field"),
        ({"x": {"field": "seed", "values": [1, 2]}}, {"num_images": 2}, "num_images"),
        # 64 cells of 256x256 x 150 steps: each within the budget, together over it
        (
            {"x": {"field": "steps", "values": [150] * 8}, "y": {"field": "seed", "values": list(range(8))}},
            {"width": 256, "height": 256},
            "grid",
        ),
    ]
    for grid, extra, field in cases:
        body = {"prompt": "a red knight", **SMALL, "grid": grid, **extra}
        answer = await client.post("/v1/generations", json=body)
        assert answer.status_code == 422, (grid, answer.text)
        assert answer.json()["error"]["field"] == field, answer.json()


async def test_a1111_clients_get_each_image_prompt_in_all_prompts(wildcard_server: RunningServer) -> None:
    """Through /sdapi/v1 the prompt's variations are chosen as A1111's Dynamic Prompts extension chooses them,
    and `all_prompts` lists each image's prompt."""
    from tests.test_a1111 import call, client

    api = await call(client, wildcard_server)
    result = await call(api.txt2img, prompt="a __colours__ knight", seed=3, batch_size=3, width=64, height=64, steps=2)
    prompts = result.info["all_prompts"]
    assert len(prompts) == 3 and all(prompt.split()[1] in {"crimson", "cobalt", "emerald"} for prompt in prompts)
    assert [text.split("\n")[0] for text in result.info["infotexts"]] == prompts
