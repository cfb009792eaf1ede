"""The AUTOMATIC1111 API driven by webuiapi, the client scripts use, against a real server."""

from __future__ import annotations

import base64
import io
import threading
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx
import numpy as np
import pytest
import torch
import webuiapi
from PIL import Image

from actors.encoding import read_parameters
from actors.keys import KeyStore, SqliteKeys
from tests.conftest import RunningServer, install_loras, server_config, start_server
from tests.helpers import gradient_image, square_image, wait_for_state

pytestmark = pytest.mark.anyio

SMALL = {"width": 64, "height": 64, "steps": 2}


def client(server: RunningServer, **auth: str) -> webuiapi.WebUIApi:
    return webuiapi.WebUIApi(host="127.0.0.1", port=server.handle.api_port, sampler="Euler a", steps=2, **auth)


async def call(function: Any, *args: Any, **kwargs: Any) -> Any:
    return await anyio.to_thread.run_sync(partial(function, *args, **kwargs))


async def newest_request(server: RunningServer) -> dict[str, Any]:
    request: dict[str, Any] = (await server.client.get("/v1/generations")).json()["items"][0]["request"]
    return request


async def test_txt2img_batches_and_iterations_with_their_seeds_and_infotexts(server: RunningServer) -> None:
    api = await call(client, server)
    result = await call(api.txt2img, prompt="a knight", seed=40, batch_size=2, n_iter=2, cfg_scale=6, **SMALL)
    assert len(result.images) == 4 and result.info["all_seeds"] == [40, 41, 42, 43]
    assert result.info["seed"] == 40 and result.info["sampler_name"] == "Euler a"
    assert (result.info["width"], result.info["height"], result.info["cfg_scale"]) == (64, 64, 6.0)
    assert len(result.info["task_ids"]) == 2  # one task per iteration, in REST like any other
    raw = await call(
        api.session.post, f"{api.baseurl}/txt2img", json={"prompt": "a knight", "seed": 40, "n_iter": 1, **SMALL}
    )
    body = raw.json()
    assert not body["images"][0].startswith("data:") and isinstance(body["info"], str)
    for image, infotext in zip(result.images, result.info["infotexts"], strict=True):
        assert read_parameters(image) == infotext and "Sampler: Euler a" in infotext
    for task_id in result.info["task_ids"]:
        view = (await server.client.get(f"/v1/generations/{task_id}")).json()
        assert view["state"] == "succeeded" and view["request"]["scheduler"] == "euler_a"


async def test_samplers_and_schedules_are_listed_and_accepted(server: RunningServer) -> None:
    api = await call(client, server)
    samplers = await call(api.util_get_sampler_names)
    schedules = await call(api.util_get_scheduler_names)
    assert {"Euler a", "Euler", "DPM++ 2M", "UniPC", "DDIM"} <= set(samplers)
    assert {"automatic", "karras"} <= set(schedules)
    accepted = {}
    for sampler, schedule, ours in (
        ("DPM++ 2M Karras", "automatic", "dpmpp_2m_karras"),
        ("DPM++ 2M", "karras", "dpmpp_2m_karras"),
        ("DPM++ 2M", "uniform", "dpmpp_2m"),
        ("Euler", "Automatic", "euler"),
        ("UniPC", "automatic", "unipc"),
        ("DDIM", "automatic", "ddim"),
    ):
        await call(api.txt2img, prompt="x", sampler_name=sampler, scheduler=schedule, steps=1, width=64, height=64)
        accepted[(sampler, schedule)] = (await newest_request(server))["scheduler"] == ours
    assert all(accepted.values()), accepted
    with pytest.raises(RuntimeError, match=r"sampler_name.*Heun|Heun.*sampler_name"):
        await call(api.txt2img, prompt="x", sampler_name="Heun", **SMALL)
    with pytest.raises(RuntimeError, match="Exponential"):
        await call(api.txt2img, prompt="x", scheduler="Exponential", **SMALL)


async def test_loras_styles_hires_and_controlnet_map_to_ours(
    server: RunningServer, tiny_loras: dict[str, Path], tmp_path: Path
) -> None:
    install_loras(tmp_path / "data", tiny_loras)
    api = await call(client, server)
    await call(api.txt2img, prompt="a knight, <lora:ink-lora:0.7>, full body", styles=["anime"], **SMALL)
    request = await newest_request(server)
    assert request["loras"] == [{"name": "ink-lora", "weight": 0.7}] and request["styles"] == ["anime"]
    assert request["prompt"] == "a knight, full body"  # the tag is out of the text
    with pytest.raises(RuntimeError, match="missing-lora"):
        await call(api.txt2img, prompt="x <lora:missing-lora:1>", **SMALL)
    unit = webuiapi.ControlNetUnit(
        image=square_image(64), module="none", model="control_openpose_sdxl", weight=0.6, guidance_end=0.8
    )
    result = await call(api.txt2img, prompt="a dancer", controlnet_units=[unit], **SMALL)
    control = (await newest_request(server))["control"][0]
    assert (control["type"], control["strength"], control["end"], control["preprocess"]) == (
        "openpose",
        0.6,
        0.8,
        False,
    )
    assert len(result.images) == 1
    unknown = await call(
        api.session.post,
        f"{api.baseurl}/txt2img",
        json={"prompt": "x", **SMALL, "alwayson_scripts": {"ADetailer": {"args": [True]}}},
    )
    assert unknown.status_code == 200 and "ADetailer" in unknown.json()["info"]  # a warning, not a refusal


async def test_img2img_and_inpainting(server: RunningServer) -> None:
    api = await call(client, server)
    init, mask = gradient_image(64), square_image(64, (16, 16, 47, 47))
    result = await call(
        api.img2img, images=[init], prompt="a knight", denoising_strength=0.5, seed=3, steps=4, width=64, height=64
    )
    request = await newest_request(server)
    assert request["init_image"].startswith("up_") and request["strength"] == 0.5 and len(result.images) == 1
    raw = await server.client.post(
        "/sdapi/v1/img2img", json={"prompt": "x", "init_images": [_b64(gradient_image(96))], "steps": 2}
    )
    assert raw.status_code == 200 and (await newest_request(server))["width"] == 96  # no size: the image's
    inpainted = await call(
        api.img2img,
        images=[init],
        mask_image=mask,
        prompt="a knight",
        denoising_strength=1.0,
        mask_blur=0,
        inpaint_full_res=True,
        steps=4,
        width=64,
        height=64,
    )
    request = await newest_request(server)
    assert request["mask"] and request["inpaint_area"] == "masked"
    pixels = np.asarray(inpainted.images[0].convert("RGB"))
    outside = np.asarray(mask.convert("L")) == 0
    assert (pixels[outside] == np.asarray(init)[outside]).all()
    inverted = await call(
        api.img2img, images=[init], mask_image=mask, inpainting_mask_invert=1, denoising_strength=1.0, mask_blur=0,
        prompt="a knight", steps=4, width=64, height=64,
    )  # fmt: skip
    pixels = np.asarray(inverted.images[0].convert("RGB"))
    assert (pixels[~outside] == np.asarray(init)[~outside]).all()  # the white part was kept this time


async def test_errors_are_json_with_an_error_object(server: RunningServer) -> None:
    response = await server.client.post("/sdapi/v1/txt2img", json={"prompt": "x", "cfg_scale": 99, **SMALL})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["field"] == "cfg_scale" and "cfg_scale" in error["message"]
    style = await server.client.post("/sdapi/v1/txt2img", json={"prompt": "x", "styles": ["no-such-style"], **SMALL})
    assert style.status_code == 422 and style.json()["error"]["field"] == "styles"  # A1111's name for it
    assert "no-such-style" in style.json()["error"]["message"]
    with_header = await server.client.get("/sdapi/v1/options", headers={"Authorization": "Basic Og=="})  # ":"
    assert with_header.status_code == 200  # auth off: whatever Authorization a client sends is ignored


@pytest.fixture
async def owners(tmp_path: Path, tiny_model: Path) -> AsyncIterator[tuple[RunningServer, dict[str, str]]]:
    """Auth on, keys for alice and bob, and a second model to switch to."""
    data = tmp_path / "data"
    keys = KeyStore(SqliteKeys(data / "forge.sqlite3"))
    tokens = {owner: keys.create(owner, "unlimited", ["generate"])[1] for owner in ("alice", "bob")}
    config = server_config(data, tiny_model, auth=True, models={"second": str(tiny_model)})
    async for running in start_server(config):
        yield running, tokens


async def test_basic_auth_options_per_caller_and_interrupt_only_ones_own(
    owners: tuple[RunningServer, dict[str, str]],
) -> None:
    server, tokens = owners
    alice = await call(client, server, username="alice", password=tokens["alice"])
    bob = await call(client, server, username="bob", password=tokens["bob"])
    titles = [model["title"] for model in await call(alice.get_sd_models)]
    assert titles == ["tiny-sdxl", "second"]
    await call(alice.set_options, {"sd_model_checkpoint": "second", "CLIP_stop_at_last_layers": 2})
    assert (await call(alice.get_options))["sd_model_checkpoint"] == "second"
    assert (await call(bob.get_options))["sd_model_checkpoint"] == "tiny-sdxl"  # not everyone's
    wrong = httpx.BasicAuth("bob", tokens["alice"])
    refused = await server.client.get("/sdapi/v1/options", auth=wrong)
    assert refused.status_code == 401 and refused.json()["error"]["field"] == "Authorization"

    outcome: dict[str, Any] = {}
    done = threading.Event()

    def long_job() -> None:
        try:
            outcome["result"] = alice.txt2img(prompt="a long night", width=512, height=512, steps=150)
        finally:
            done.set()

    thread = threading.Thread(target=long_job, daemon=True)
    thread.start()
    headers = {"Authorization": f"Bearer {tokens['alice']}"}
    async with httpx.AsyncClient(base_url=server.base_url, headers=headers) as rest:
        with anyio.fail_after(60):
            while not (running := (await rest.get("/v1/generations?state=running")).json()["items"]):
                await anyio.sleep(0.05)
        task_id = running[0]["id"]
        assert running[0]["request"]["model"] == "second"  # alice's model
        with anyio.fail_after(30):
            while (progress := await call(alice.get_progress))["state"]["sampling_step"] == 0:
                await anyio.sleep(0.05)
        assert progress["progress"] > 0 and progress["state"]["job_count"] == 1
        assert (await call(bob.get_progress))["state"]["job_count"] == 0  # bob sees none of alice's
        await call(bob.interrupt)
        await anyio.sleep(0.5)
        assert (await rest.get(f"/v1/generations/{task_id}")).json()["state"] == "running"  # bob's did nothing
        await call(alice.interrupt)
        await anyio.to_thread.run_sync(done.wait)
        assert outcome["result"].info["cancelled"] is True and outcome["result"].images == []
        assert (await wait_for_state(rest, task_id))["state"] == "cancelled"
    idle = await call(alice.get_progress)
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0  # what SillyTavern polls for


async def test_clip_skip_is_each_callers_own_an_override_is_one_requests_and_png_info_reads_it(
    owners: tuple[RunningServer, dict[str, str]],
) -> None:
    server, tokens = owners
    alice = await call(client, server, username="alice", password=tokens["alice"])
    bob = await call(client, server, username="bob", password=tokens["bob"])
    assert (await call(alice.get_options))["CLIP_stop_at_last_layers"] == 2  # SDXL's own conditioning
    await call(alice.set_options, {"CLIP_stop_at_last_layers": 1})
    assert (await call(alice.get_options))["CLIP_stop_at_last_layers"] == 1
    assert (await call(bob.get_options))["CLIP_stop_at_last_layers"] == 2  # not everyone's
    fixed: dict[str, Any] = {"prompt": "a knight", "seed": 5, **SMALL}
    mine, theirs = await call(alice.txt2img, **fixed), await call(bob.txt2img, **fixed)
    assert mine.info["clip_skip"] == 1 and "Clip skip: 1" in mine.info["infotexts"][0]
    assert theirs.info["clip_skip"] == 2 and "Clip skip: 2" in theirs.info["infotexts"][0]
    assert not np.array_equal(np.asarray(mine.image), np.asarray(theirs.image))
    once = await call(bob.txt2img, override_settings={"CLIP_stop_at_last_layers": 1}, **fixed)
    assert np.array_equal(np.asarray(once.image), np.asarray(mine.image))  # clip skip 1 for this request
    assert (await call(bob.get_options))["CLIP_stop_at_last_layers"] == 2  # and only for it
    read = await call(alice.png_info, mine.image)
    assert read.parameters["Clip skip"] == "1" and read.info == mine.info["infotexts"][0]
    refused = await call(alice.session.post, f"{alice.baseurl}/options", json={"CLIP_stop_at_last_layers": 13})
    assert refused.status_code == 422 and refused.json()["error"]["field"] == "CLIP_stop_at_last_layers"


async def test_embeddings_are_listed_and_named_in_prompts_and_bad_weights_are_refused(server: RunningServer) -> None:
    from safetensors.torch import save_file

    from engines.tiny_extras import build_tiny_embedding

    folder = server.handle.config.embeddings_path  # read on every call: no restart needed
    build_tiny_embedding(folder / "inkneg.safetensors", seed=1, vectors=2)
    save_file({"emb_params": torch.zeros(1, 768)}, str(folder / "sd15-only.safetensors"))  # not for SDXL
    api = await call(client, server)
    listing = await call(api.get_embeddings)
    assert listing["loaded"] == {
        "inkneg": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": 64, "vectors": 2}
    }
    assert set(listing["skipped"]) == {"sd15-only"}
    fixed: dict[str, Any] = {"prompt": "(a knight:1.2), [castle] BREAK night", "seed": 5, **SMALL}
    named = await call(api.txt2img, negative_prompt="blurry, inkneg", **fixed)
    unknown = await call(api.txt2img, negative_prompt="blurry, nosuchemb", **fixed)  # plain text
    assert not np.array_equal(np.asarray(named.image), np.asarray(unknown.image))
    for field, body in (("prompt", {"prompt": "a (knight:6)"}), ("negative_prompt", {"negative_prompt": "(x:-1)"})):
        refused = await server.client.post("/sdapi/v1/txt2img", json={"prompt": "a knight", **body, **SMALL})
        assert refused.status_code == 422 and refused.json()["error"]["field"] == field


async def test_the_info_is_valid_json_and_images_decode(server: RunningServer) -> None:
    response = await server.client.post(
        "/sdapi/v1/txt2img", json={"prompt": "x", "seed": 9, "sampler_name": "Euler", **SMALL}
    )
    body = response.json()
    Image.open(io.BytesIO(base64.b64decode(body["images"][0]))).verify()
    assert body["parameters"]["seed"] == 9
    import json

    info = json.loads(body["info"])
    assert {"prompt", "all_prompts", "negative_prompt", "seed", "all_seeds", "width", "height", "sampler_name",
            "cfg_scale", "steps", "batch_size", "sd_model_name", "infotexts", "task_ids"} <= set(info)  # fmt: skip


def _b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()
