"""Model families (v-prediction, zero terminal SNR), configured VAEs and the hires fix, on every interface that
takes them: a v-pred single-file checkpoint announced by its keys, a second VAE swapped in, and A1111's hires
fix through the webuiapi client."""

from __future__ import annotations

import base64
import io
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
import torch
import webuiapi
from PIL import Image

from actors.encoding import read_parameters
from engines.hires import load_vae
from engines.models import resolve_models
from engines.schedulers import SAMPLERS, make_scheduler
from engines.tiny_extras import build_tiny_vae
from forge.config import load_config
from forge.infotext import parse_infotext
from tests.conftest import RunningServer, install_postprocess_models, server_config, start_server
from tests.helpers import generate_pixels, gradient_image, png_bytes
from tests.ldm_checkpoint import ldm_vae_state, write_ldm_checkpoint

pytestmark = pytest.mark.anyio

SMALL = {"width": 64, "height": 64, "steps": 2}


@pytest.fixture(scope="module")
def family_files(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny model's weights as a v-pred, zero-SNR single file, and a second VAE for it."""
    folder = tmp_path_factory.mktemp("families")
    return {
        "vpred": write_ldm_checkpoint(tiny_model, folder / "vpred.safetensors", v_pred=True, ztsnr=True),
        "vae": build_tiny_vae(tiny_model, folder / "other-vae"),
    }


def family_settings(files: dict[str, Path]) -> dict[str, Any]:
    checkpoint = str(files["vpred"])
    return {
        "models": {
            "vpred": checkpoint,
            "vpred-eps": {"source": checkpoint, "prediction": "epsilon", "zero_snr": False},
        },
        "vaes": {"other": str(files["vae"])},
    }


@pytest.fixture
async def family_server(
    tmp_path: Path, tiny_model: Path, family_files: dict[str, Path]
) -> AsyncIterator[RunningServer]:
    config = server_config(tmp_path / "data", tiny_model, result_cache=False, **family_settings(family_files))
    async for running in start_server(config):
        yield running


async def call(function: Any, *args: Any, **kwargs: Any) -> Any:
    return await anyio.to_thread.run_sync(partial(function, *args, **kwargs))


def test_a_checkpoints_v_pred_and_ztsnr_keys_set_every_sampler(
    tmp_path: Path, tiny_model: Path, family_files: dict[str, Path]
) -> None:
    config = load_config(
        None,
        environ={},
        overrides={"data_dir": str(tmp_path), "model": str(tiny_model), **family_settings(family_files)},
    )
    models = {model.id: model for model in resolve_models(config)}
    vpred, forced = models["vpred"], models["vpred-eps"]
    assert (vpred.prediction, vpred.zero_snr, vpred.guidance_rescale) == ("v", True, 0.7)
    assert (forced.prediction, forced.zero_snr, forced.guidance_rescale) == ("epsilon", False, 0.0)
    assert models["tiny-sdxl"].prediction == "epsilon" and models["tiny-sdxl"].vaes == {
        "other": str(family_files["vae"])
    }
    base = make_scheduler("euler", {"prediction_type": "epsilon"}).config  # any config the folder gives
    for name in SAMPLERS:
        scheduler = make_scheduler(name, base, vpred.prediction, vpred.zero_snr)
        settings = scheduler.config
        assert settings.prediction_type == "v_prediction" and settings.rescale_betas_zero_snr, name
        assert settings.timestep_spacing == "trailing", name
        assert float(scheduler.alphas_cumprod[-1]) < 1e-6, name  # pure noise at the last timestep, finite
        plain = make_scheduler(name, base, forced.prediction, forced.zero_snr).config
        assert plain.prediction_type == "epsilon" and not plain.rescale_betas_zero_snr, name


async def test_a_v_pred_model_serves_every_sampler_and_differs_from_epsilon(family_server: RunningServer) -> None:
    client = family_server.client
    listed = {model["id"]: model for model in (await client.get("/v1/models")).json()["items"]}
    assert (listed["vpred"]["prediction"], listed["vpred"]["zero_snr"]) == ("v", True)
    assert listed["vpred"]["default_guidance_rescale"] == 0.7 and listed["vpred"]["vaes"] == ["other"]
    assert (listed["vpred-eps"]["prediction"], listed["vpred-eps"]["zero_snr"]) == ("epsilon", False)

    view, v_image = await generate_pixels(client, model="vpred", seed=3, **SMALL)
    assert view["request"]["guidance_rescale"] == 0.7
    _, eps_image = await generate_pixels(client, model="vpred-eps", seed=3, **SMALL)
    assert not np.array_equal(v_image, eps_image)
    _, unrescaled = await generate_pixels(client, model="vpred", seed=3, guidance_rescale=0, **SMALL)
    assert not np.array_equal(v_image, unrescaled)
    for name in SAMPLERS:
        _, pixels = await generate_pixels(client, model="vpred", seed=3, scheduler=name, **SMALL)
        assert pixels.std() > 0, name  # an image, not NaNs decoded to one colour


def test_a_single_file_vae_loads_as_its_diffusers_folder(family_files: dict[str, Path], tiny_model: Path) -> None:
    """An SDXL VAE shipped as one .safetensors file in the original layout (e.g. the fp16-fix VAE) takes its
    architecture from the model's own VAE config and holds the same weights as the folder it was made from."""
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    single = family_files["vae"].parent / "other-vae.safetensors"
    save_file(ldm_vae_state(family_files["vae"]), single)
    own = AutoencoderKL.from_pretrained(str(tiny_model / "vae"))
    from_folder, from_file = load_vae(str(family_files["vae"]), own, "cpu"), load_vae(str(single), own, "cpu")
    folder_weights = from_folder.state_dict()
    assert folder_weights.keys() == from_file.state_dict().keys()
    assert all(torch.equal(folder_weights[key], value) for key, value in from_file.state_dict().items())


async def test_a_configured_vae_changes_the_image_and_is_recorded(
    family_server: RunningServer, family_files: dict[str, Path]
) -> None:
    client = family_server.client
    _, own = await generate_pixels(client, seed=5, **SMALL)
    view, other = await generate_pixels(client, seed=5, vae="other", **SMALL)
    assert not np.array_equal(own, other) and view["request"]["vae"] == "other"
    image = await client.get(view["images"][0]["url"])
    with Image.open(io.BytesIO(image.content)) as opened:
        assert parse_infotext(read_parameters(opened) or "")[2]["VAE"] == "other"
    unknown = await client.post("/v1/generations", json={"prompt": "x", "vae": "missing", **SMALL})
    assert unknown.status_code == 422 and unknown.json()["error"]["field"] == "vae"

    api = await call(webuiapi.WebUIApi, host="127.0.0.1", port=family_server.handle.api_port, sampler="Euler", steps=2)
    assert await call(api.get_sd_vae) == [{"model_name": "other", "filename": str(family_files["vae"])}]
    await call(api.set_options, {"sd_vae": "other"})  # this caller's VAE from now on
    assert (await call(api.get_options))["sd_vae"] == "other"
    result = await call(api.txt2img, prompt="a knight", seed=5, **SMALL)
    assert "VAE: other" in result.info["infotexts"][0]
    own_again = await call(api.txt2img, prompt="a knight", seed=5, override_settings={"sd_vae": "None"}, **SMALL)
    assert "VAE:" not in own_again.info["infotexts"][0]
    refused = await call(api.session.post, f"{api.baseurl}/options", json={"sd_vae": "missing"})
    assert refused.status_code == 422 and "sd_vae" in refused.text
    info = await call(api.png_info, result.image)
    assert info.parameters["VAE"] == "other"


@pytest.fixture
async def hires_server(tmp_path: Path, tiny_model: Path, postprocess_models: Path) -> AsyncIterator[RunningServer]:
    install_postprocess_models(tmp_path / "data", postprocess_models)
    async for running in start_server(server_config(tmp_path / "data", tiny_model)):
        yield running


async def test_hires_fix_through_webuiapi_and_rest(hires_server: RunningServer) -> None:
    api = await call(webuiapi.WebUIApi, host="127.0.0.1", port=hires_server.handle.api_port, sampler="Euler a", steps=2)
    # webuiapi keeps ControlNet units an earlier call in this process gave in its shared default alwayson_scripts
    hires = {
        "enable_hr": True,
        "hr_scale": 2,
        "hr_second_pass_steps": 2,
        "denoising_strength": 0.5,
        "alwayson_scripts": {},
    }
    result = await call(
        api.txt2img, prompt="a knight", seed=7, hr_upscaler=webuiapi.HiResUpscaler.Latent, **hires, **SMALL
    )
    assert result.image.size == (128, 128)
    infotext = result.info["infotexts"][0]
    params = parse_infotext(infotext)[2]
    assert (params["Size"], params["Hires upscale"], params["Hires steps"]) == ("64x64", "2", "2")
    assert (params["Hires upscaler"], params["Denoising strength"]) == ("Latent", "0.5")
    parsed = (await call(api.png_info, result.image)).parameters
    assert (parsed["Hires upscale"], parsed["Hires upscaler"], parsed["Size-1"]) == ("2", "Latent", "64")
    assert parsed["Denoising strength"] == "0.5" and parsed["Hires steps"] == "2"

    resized = await call(
        api.txt2img,
        prompt="a knight",
        seed=7,
        enable_hr=True,
        hr_resize_x=96,
        hr_upscaler="Lanczos",
        alwayson_scripts={},
        **SMALL,
    )
    assert resized.image.size == (96, 96) and "Hires resize: 96x96" in resized.info["infotexts"][0]

    for body, field in (
        ({"enable_hr": True, "hr_scale": 8, "width": 128, "height": 128}, "hr_scale"),  # 1024 > the tiny 512
        ({"enable_hr": True, "hr_upscaler": "R-ESRGAN 4x+"}, "hr_upscaler"),
    ):
        refused = await call(api.session.post, f"{api.baseurl}/txt2img", json={"prompt": "x", "steps": 2, **body})
        assert refused.status_code == 422 and field in refused.json()["error"]["message"] + str(
            refused.json()["error"].get("field")
        ), refused.text

    client = hires_server.client
    view, pixels = await generate_pixels(
        client, seed=7, hires={"scale": 1.5, "upscaler": "RealESRGAN_x2plus", "steps": 2, "denoise": 0.6}, **SMALL
    )
    assert pixels.shape == (96, 96, 3) and view["request"]["hires"]["upscaler"] == "RealESRGAN_x2plus"
    upload = base64.b64encode(png_bytes(gradient_image(64))).decode()
    for hires_fields, extra, field in (
        ({"scale": 8}, {"width": 128, "height": 128}, "hires.scale"),
        ({"upscaler": "missing"}, {}, "hires.upscaler"),
        ({}, {"init_image": upload}, "hires"),
    ):
        refused = await client.post("/v1/generations", json={"prompt": "x", "hires": hires_fields, **SMALL, **extra})
        assert refused.status_code == 422 and refused.json()["error"]["field"] == field, refused.text
