"""The Gradio UI driven through gradio_client against the running server, plus file-route probes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx
import pytest
from gradio_client import Client, handle_file
from PIL import Image

from actors.encoding import read_parameters
from tests.conftest import ADAPTERS, RunningServer, install_loras, server_config, start_server
from tests.helpers import gradient_image, square_image, wait_for_state

pytestmark = [pytest.mark.anyio, pytest.mark.adapters]

# the generate endpoint's inputs, in order
DEFAULTS: dict[str, Any] = {
    "prompt": "a dwarf blacksmith",
    "negative": "",
    "style": [],
    "num_images": 1,
    "size": "square",
    "width": 64,
    "height": 64,
    "steps": 3,
    "guidance": 5.0,
    "scheduler": "euler",
    "random_seed": True,
    "seed": 0,
    "output_format": "png",
    "model": "tiny-sdxl",
    "pose": "none",
    "loras": [],
    "lora_weight": 0.8,
    "upscale": "off",
    "remove_background": False,
    "trim": False,
    "pixel_palette": "off",
    "pixel_factor": 8,
    "outline": False,
    "sprite_sheet": False,
    "clip_skip": 0,
    "vae": "Automatic",
    "hires_scale": 1,
    "hires_upscaler": "latent",
    "hires_steps": 0,
    "hires_denoise": 0.7,
    "tiling": "none",
    "variations": "random",
    "grid_x_field": "off",
    "grid_x_values": "",
    "grid_y_field": "off",
    "grid_y_values": "",
    "batch": False,
    "character": "none",
    "init_image": None,
    "strength": 0.6,
    "inpaint_area": "whole",
    "reference_1": None,
    "reference_1_strength": 0.6,
    "reference_1_mode": "full",
    "reference_2": None,
    "reference_2_strength": 0.6,
    "reference_2_mode": "full",
}


def ui_client(server: RunningServer) -> Client:
    return Client(f"http://127.0.0.1:{server.handle.ui_port}/", verbose=False)


@pytest.fixture
async def client(server: RunningServer) -> AsyncIterator[Client]:
    """gradio_client is synchronous: tests call it from a worker thread."""
    connected = await anyio.to_thread.run_sync(ui_client, server)
    yield connected
    await anyio.to_thread.run_sync(connected.close)


def run_generate(client: Client, **changes: Any) -> list[tuple[Any, ...]]:
    """Every update the page would show, in order."""
    job = client.submit(*{**DEFAULTS, **changes}.values(), api_name="/generate")
    updates = list(job)
    final = job.result()  # raises the error the page would show
    return updates or [tuple(final)]


def gallery_files(update: tuple[Any, ...]) -> list[Path]:
    return [Path(item["image"]) for item in update[2]]


async def test_generate_shows_progress_then_gallery_with_seeds(server: RunningServer, client: Client) -> None:
    updates = await anyio.to_thread.run_sync(
        lambda: run_generate(client, num_images=2, random_seed=False, seed=21, steps=4, size="landscape")
    )
    statuses = [update[0] for update in updates]
    assert any("step 4/4" in status for status in statuses), statuses
    assert "seeds 21, 22" in statuses[-1]
    files = gallery_files(updates[-1])
    assert len(files) == 2
    with Image.open(files[1]) as image:
        assert image.size == (80, 64)
        assert "Seed: 22" in (read_parameters(image) or "")
    listed = (await server.client.get("/v1/generations")).json()["items"]
    assert len(listed) == 1 and listed[0]["state"] == "succeeded"  # the same task is visible over REST


async def test_batch_queues_one_task_per_line(server: RunningServer, client: Client) -> None:
    updates = await anyio.to_thread.run_sync(
        lambda: run_generate(client, prompt="an orc chief\n\na goblin thief\nan elf mage", batch=True)
    )
    assert len(gallery_files(updates[-1])) == 3
    prompts = {item["request"]["prompt"] for item in (await server.client.get("/v1/generations")).json()["items"]}
    assert prompts == {"an orc chief", "a goblin thief", "an elf mage"}


async def test_bad_input_is_a_clear_message_not_a_traceback(server: RunningServer, client: Client) -> None:
    with pytest.raises(Exception, match="multiple of 8") as raised:
        await anyio.to_thread.run_sync(lambda: run_generate(client, size="custom", width=100))
    assert "Traceback" not in str(raised.value)
    with pytest.raises(Exception, match="must not be blank"):
        await anyio.to_thread.run_sync(lambda: run_generate(client, prompt="   "))


async def test_full_queue_is_reported(tmp_path: Path, tiny_model: Path) -> None:
    config = server_config(tmp_path / "data", tiny_model, max_queue=1, **ADAPTERS)
    async for server in start_server(config):
        long = {"prompt": "long", "width": 512, "height": 512, "steps": 150}
        running = (await server.client.post("/v1/generations", json=long)).json()
        await wait_for_state(server.client, running["id"], {"running"})
        await server.client.post("/v1/generations", json=long)  # fills the queue
        client = await anyio.to_thread.run_sync(ui_client, server)
        with pytest.raises(Exception, match="queue is full"):
            await anyio.to_thread.run_sync(run_generate, client)
        await anyio.to_thread.run_sync(client.close)
        for item in (await server.client.get("/v1/generations")).json()["items"]:
            await server.client.post(item["links"]["cancel"])


async def test_cancel_button_cancels_this_sessions_task(server: RunningServer, client: Client) -> None:
    other = (await server.client.post("/v1/generations", json={"prompt": "someone else's", "steps": 2})).json()
    job = client.submit(
        *{**DEFAULTS, "size": "custom", "width": 512, "height": 512, "steps": 150}.values(), api_name="/generate"
    )
    with anyio.fail_after(30):
        while not (
            running := [
                item
                for item in (await server.client.get("/v1/generations?state=running")).json()["items"]
                if item["request"]["prompt"] == DEFAULTS["prompt"]
            ]
        ):
            await anyio.sleep(0.05)
    message = await anyio.to_thread.run_sync(lambda: client.predict(api_name="/cancel"))
    assert message == "Cancelled 1 task(s)."
    assert (await wait_for_state(server.client, running[0]["id"]))["state"] == "cancelled"
    assert (await wait_for_state(server.client, other["id"]))["state"] == "succeeded"
    final = await anyio.to_thread.run_sync(job.result)  # waits for the page's last update
    assert "Cancelled" in final[0]


async def test_history_reuse_and_same_seed(server: RunningServer, client: Client) -> None:
    await anyio.to_thread.run_sync(
        lambda: run_generate(
            client,
            prompt="a paladin",
            random_seed=False,
            seed=5,
            steps=2,
            output_format="webp",
            style=["anime", "chibi"],
            pose="front",
            pixel_palette="game-boy",
            pixel_factor=4,
            sprite_sheet=True,
        )
    )
    history = await anyio.to_thread.run_sync(lambda: client.predict(api_name="/history"))
    assert len(history) == 1 and history[0]["caption"] == "a paladin"
    task_id = (await server.client.get("/v1/generations")).json()["items"][0]["id"]
    settings = await anyio.to_thread.run_sync(lambda: client.predict(task_id, api_name="/reuse"))
    assert settings[0] == "a paladin" and settings[10] is False and settings[11] == 5 and settings[12] == "webp"
    assert settings[2] == ["anime", "chibi"] and settings[13] == "tiny-sdxl" and settings[14] == "front"
    spec = (await server.client.get(f"/v1/generations/{task_id}")).json()["request"]
    assert spec["styles"] == ["anime", "chibi"] and spec["control"][0]["pose"] == "front"
    assert spec["postprocess"]["pixel_art"] == {"factor": 4, "colors": None, "palette": "game-boy", "outline": False}
    assert list(settings[17:24]) == ["off", False, False, "game-boy", 4, False, True]
    assert await anyio.to_thread.run_sync(lambda: client.predict(task_id, api_name="/same_seed")) == ("", False, 5)


async def test_clip_skip_and_the_hires_fix_come_from_the_advanced_panel(server: RunningServer, client: Client) -> None:
    updates = await anyio.to_thread.run_sync(
        lambda: run_generate(
            client, random_seed=False, seed=3, clip_skip=1, hires_scale=2, hires_steps=2, hires_denoise=0.5
        )
    )
    [file] = gallery_files(updates[-1])
    with Image.open(file) as image:
        assert image.size == (128, 128)
        parameters = read_parameters(image) or ""
    assert "Clip skip: 1" in parameters and "Hires upscale: 2" in parameters and "Hires steps: 2" in parameters
    assert "Denoising strength: 0.5" in parameters and "Hires upscaler: Latent" in parameters
    task_id = (await server.client.get("/v1/generations")).json()["items"][0]["id"]
    settings = await anyio.to_thread.run_sync(lambda: client.predict(task_id, api_name="/reuse"))
    assert list(settings[24:]) == [1, "None", 2, "latent", 2, 0.5, "none", "random", "off", "", "off", ""]


async def test_prompt_variations_show_each_image_prompt(server: RunningServer, client: Client) -> None:
    updates = await anyio.to_thread.run_sync(
        lambda: run_generate(client, prompt="a {red|blue} knight", variations="combinatorial", num_images=2)
    )
    captions = [item["caption"] for item in updates[-1][2]]
    assert [caption.split(": ", 1)[1] for caption in captions] == ["a red knight", "a blue knight"]
    task_id = (await server.client.get("/v1/generations")).json()["items"][0]["id"]
    settings = await anyio.to_thread.run_sync(lambda: client.predict(task_id, api_name="/reuse"))
    assert settings[0] == "a {red|blue} knight" and settings[-5] == "combinatorial"


async def test_the_prompt_matrix_panel_makes_a_grid_after_its_cells(server: RunningServer, client: Client) -> None:
    matrix = {"grid_x_field": "prompt", "grid_x_values": "red, blue", "grid_y_field": "guidance_scale",
              "grid_y_values": "3, 7"}  # fmt: skip
    updates = await anyio.to_thread.run_sync(lambda: run_generate(client, prompt="a red knight", **matrix))
    captions = [item["caption"] for item in updates[-1][2]]
    assert len(captions) == 5 and captions[-1] == "grid"
    assert [caption.split(": ", 1)[1] for caption in captions[:4]] == ["a red knight", "a blue knight"] * 2
    with Image.open(gallery_files(updates[-1])[-1]) as grid:
        assert grid.width == 3 * 64  # a label column and two cells
    task_id = (await server.client.get("/v1/generations")).json()["items"][0]["id"]
    settings = await anyio.to_thread.run_sync(lambda: client.predict(task_id, api_name="/reuse"))
    assert list(settings[-4:]) == ["prompt", "red,blue", "guidance_scale", "3,7"]


def _probes(server: RunningServer) -> Iterator[str]:
    data = Path(server.handle.config.data_dir).resolve()
    targets = [
        "/etc/passwd",
        str(data / "forge.sqlite3"),
        "../../../../etc/passwd",
        "data/forge.sqlite3",
        "../forge.sqlite3",
        f"{data}/outputs/../forge.sqlite3",
        str(data / "models" / "tiny-sdxl" / "model_index.json"),
        "%2e%2e/%2e%2e/etc/passwd",
    ]
    for prefix in ("/file=", "/gradio_api/file=", "/gradio_api/file/"):
        for target in targets:
            yield prefix + target


async def test_file_routes_serve_nothing_outside_outputs(server: RunningServer) -> None:
    secrets = [b"root:x:0:0", b"SQLite format 3", b"StableDiffusionXLPipeline"]
    leaked = []
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.handle.ui_port}") as client:
        for probe in _probes(server):
            response = await client.get(probe)
            if response.status_code == 200 and any(secret in response.content for secret in secrets):
                leaked.append(probe)
    assert leaked == [], f"files leaked through: {leaked}"


async def test_a_lora_added_while_the_server_runs_is_offered_on_the_next_page_load(
    server: RunningServer, client: Client, tiny_loras: dict[str, Path]
) -> None:
    def offered() -> list[str]:
        update = client.predict(api_name="/lora_choices")
        return [choice[0] if isinstance(choice, list | tuple) else choice for choice in update["choices"]]

    assert await anyio.to_thread.run_sync(offered) == []
    install_loras(server.handle.config.data_path, tiny_loras, {"ink_outline": next(iter(tiny_loras))})
    assert await anyio.to_thread.run_sync(offered) == ["ink_outline"]


def _image_file(folder: Path, name: str, image: Image.Image) -> str:
    path = folder / name
    image.save(path)
    return str(path)


async def test_characters_tab_saves_a_character_that_create_uses_with_an_image_and_references(
    server: RunningServer, client: Client, tmp_path: Path
) -> None:
    reference = _image_file(tmp_path, "reference.png", gradient_image(64))
    gallery = [{"image": handle_file(reference), "caption": None}]
    message, table, *_ = await anyio.to_thread.run_sync(
        lambda: client.predict("mira", "Mira, a silver-haired mage", gallery, api_name="/create_character")
    )
    assert "Saved **mira** with 1 reference image(s)" in message
    assert table["data"] == [["mira", 1, "Mira, a silver-haired mage", 1]]
    init = _image_file(tmp_path, "init.png", gradient_image(64, horizontal=False))
    editor = {"background": handle_file(init), "layers": [], "composite": None, "id": None}
    await anyio.to_thread.run_sync(
        lambda: run_generate(
            client,
            prompt="casting a spell",
            character="mira",
            init_image=editor,
            strength=0.5,
            reference_1=handle_file(_image_file(tmp_path, "style.png", square_image(64))),
            reference_1_mode="style",
        )
    )
    request = (await server.client.get("/v1/generations")).json()["items"][0]["request"]
    assert request["character"]["name"] == "mira" and request["prompt"].startswith("Mira, a silver-haired mage")
    assert request["init_image"].startswith("up_") and request["strength"] == 0.5 and request["mask"] is None
    assert [r["mode"] for r in request["references"]] == ["style"]  # the request's own, not the character's
    status, sheet = await anyio.to_thread.run_sync(
        lambda: client.predict("mira", "turnaround", 2, api_name="/character_sheet")
    )
    assert "Done: 4 image(s)" in status and len(sheet) == 4


async def test_characters_in_the_ui_belong_to_their_owner(tmp_path: Path, tiny_model: Path) -> None:
    from actors.keys import KeyStore, SqliteKeys

    data = tmp_path / "data"
    keys = KeyStore(SqliteKeys(data / "forge.sqlite3"))
    tokens = {owner: keys.create(owner, "unlimited", ["generate"])[1] for owner in ("alice", "bob")}
    async for server in start_server(server_config(data, tiny_model, auth=True, **ADAPTERS)):
        url = f"http://127.0.0.1:{server.handle.ui_port}/"
        alice = await anyio.to_thread.run_sync(partial(Client, url, auth=("alice", tokens["alice"]), verbose=False))
        bob = await anyio.to_thread.run_sync(partial(Client, url, auth=("bob", tokens["bob"]), verbose=False))
        await anyio.to_thread.run_sync(partial(alice.predict, "ayla", "Ayla", [], api_name="/create_character"))
        table, _, _ = await anyio.to_thread.run_sync(partial(bob.predict, api_name="/characters"))
        assert not any(row and row[0] for row in table["data"])
        with pytest.raises(Exception, match=r"no character 'ayla'|ayla is not in the list of choices"):
            await anyio.to_thread.run_sync(partial(bob.predict, "ayla", "turnaround", 2, api_name="/character_sheet"))
        mine, _, _ = await anyio.to_thread.run_sync(partial(alice.predict, api_name="/characters"))
        assert [row[0] for row in mine["data"]] == ["ayla"]
