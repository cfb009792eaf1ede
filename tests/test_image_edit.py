"""img2img and inpainting through the REST API, on the tiny model."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from actors.encoding import read_parameters
from tests.conftest import RunningServer, server_config, start_server
from tests.helpers import generate_pixels, gradient_image, png_bytes, square_image, submit, wait_for_state

pytestmark = pytest.mark.anyio

STEPS = {"steps": 4, "seed": 5}


def b64(image: Image.Image) -> str:
    return base64.b64encode(png_bytes(image)).decode()


async def upload(server: RunningServer, image: Image.Image) -> str:
    response = await server.client.post("/v1/uploads", content=png_bytes(image), headers={"Content-Type": "image/png"})
    assert response.status_code == 201, response.text
    upload_id: str = response.json()["id"]
    return upload_id


async def test_img2img_keeps_the_image_at_low_strength_and_repaints_it_at_full(server: RunningServer) -> None:
    init = gradient_image(64)
    expected = np.asarray(init)
    init_id = await upload(server, init)
    for strength in (0.0, 0.05):
        view, pixels = await generate_pixels(server.client, init_image=init_id, strength=strength, **STEPS)
        assert np.abs(pixels.astype(int) - expected).mean() < 2, strength
    view, pixels = await generate_pixels(server.client, init_image=b64(init), strength=1.0, **STEPS)
    assert np.abs(pixels.astype(int) - expected).mean() > 10
    assert view["request"]["strength"] == 1.0 and view["request"]["init_image"] == init_id  # the same upload
    response = await server.client.get(view["images"][0]["url"])
    with Image.open(io.BytesIO(response.content)) as image:
        assert "Denoising strength: 1" in (read_parameters(image) or "")


async def test_sizes_follow_the_init_image_when_omitted(server: RunningServer) -> None:
    view, pixels = await generate_pixels(
        server.client, init_image=b64(gradient_image(96).crop((0, 0, 96, 64))), **STEPS
    )
    assert (view["request"]["width"], view["request"]["height"]) == (96, 64) and pixels.shape[:2] == (64, 96)


@pytest.mark.parametrize("area", ["whole", "masked"])
async def test_inpainting_keeps_every_pixel_outside_the_mask(server: RunningServer, area: str) -> None:
    init = gradient_image(64, horizontal=False)
    mask = square_image(64, (20, 20, 43, 43))
    view, pixels = await generate_pixels(
        server.client, init_image=b64(init), mask=b64(mask), strength=1.0, mask_blur=4, inpaint_area=area, **STEPS
    )
    outside = np.asarray(mask.convert("L")) == 0
    assert (pixels[outside] == np.asarray(init)[outside]).all()
    assert np.abs(pixels[~outside].astype(int) - np.asarray(init)[~outside]).mean() > 10
    assert view["request"]["inpaint_area"] == area


async def test_a_larger_mask_is_resized_to_the_image(server: RunningServer) -> None:
    init = gradient_image(64)
    mask = Image.new("L", (256, 256), 0)
    mask.paste(255, (0, 0, 128, 256))  # the left half
    _, pixels = await generate_pixels(server.client, init_image=b64(init), mask=b64(mask), strength=1.0, **STEPS)
    assert (pixels[:, 40:] == np.asarray(init)[:, 40:]).all()


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"init_image": "x" * 10, "strength": 0.5}, "init_image"),
        ({"init_image": "up_" + "0" * 32}, "init_image"),
        ({"strength": 1.5, "init_image": "up_" + "0" * 32}, "strength"),
        ({"mask": "bm90IGFuIGltYWdl"}, "mask"),
        ({"init_image": "GRADIENT", "mask": "bm90IGFuIGltYWdl"}, "mask"),
        ({"init_image": "GRADIENT", "inpaint_area": "everything"}, "inpaint_area"),
        ({"init_image": "HUGE"}, "init_image"),  # over the side limit
    ],
)
async def test_bad_edits_are_refused_naming_the_field(
    server: RunningServer, fields: dict[str, object], field: str
) -> None:
    images = {"GRADIENT": b64(gradient_image(64)), "HUGE": b64(Image.new("RGB", (4104, 8)))}
    body = {"prompt": "a knight", **{k: images.get(v, v) if isinstance(v, str) else v for k, v in fields.items()}}
    response = await server.client.post("/v1/generations", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == field
    assert (await server.client.get("/v1/generations")).json()["items"] == []


async def test_inpainting_and_img2img_work_with_a_pose_controlnet(server: RunningServer) -> None:
    init, mask = gradient_image(64), square_image(64, (8, 8, 55, 55))
    control = {"type": "openpose", "pose": "front"}
    _, pixels = await generate_pixels(
        server.client, init_image=b64(init), mask=b64(mask), strength=1.0, control=control, **STEPS
    )
    outside = np.asarray(mask.convert("L")) == 0
    assert (pixels[outside] == np.asarray(init)[outside]).all()
    view, _ = await generate_pixels(server.client, init_image=b64(init), strength=0.8, control=control, **STEPS)
    assert view["request"]["control"][0]["pose"] == "front"


async def test_an_inpainting_checkpoint_repaints_where_the_model_names_one(
    tmp_path: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from engines.tiny_extras import build_tiny_inpainting_unet

    inpainting = build_tiny_inpainting_unet(tiny_model, tmp_path_factory.mktemp("inpaint") / "tiny-inpainting")
    config = server_config(
        tmp_path / "data",
        tiny_model,
        models={"plain": str(tiny_model), "broken": str(tiny_model)},
        inpainting_models={"tiny-sdxl": str(inpainting), "broken": str(tiny_model)},  # a 4-channel UNet
    )
    init, mask = gradient_image(64), square_image(64, (16, 16, 47, 47))
    fields = {"init_image": b64(init), "mask": b64(mask), "strength": 1.0, **STEPS}
    async for server in start_server(config):
        listed = {m["id"]: m["inpainting"] for m in (await server.client.get("/v1/models")).json()["items"]}
        assert listed == {"tiny-sdxl": True, "plain": False, "broken": True}
        _, own = await generate_pixels(server.client, **fields)
        _, base = await generate_pixels(server.client, model="plain", **fields)
        failed = await wait_for_state(server.client, (await submit(server.client, model="broken", **fields))["id"])
    outside = np.asarray(mask.convert("L")) == 0
    for pixels in (own, base):
        assert (pixels[outside] == np.asarray(init)[outside]).all()
    assert np.abs(own[~outside].astype(int) - base[~outside]).mean() > 3  # a different UNet repainted it
    assert failed["state"] == "failed" and failed["error"]["code"] == "inpainting_unavailable"
    assert "9" in failed["error"]["message"]
