"""Reference images through a tiny IP-Adapter that loads through diffusers' load_ip_adapter, as real ones do."""

from __future__ import annotations

import gc
import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from actors.encoding import read_parameters
from engines.eager import EagerEngine
from engines.models import tiny_info
from forge.engine import Job, ModelInfo, Reference, References
from forge.ip_adapters import RECOMMENDED, IpAdapterSource
from tests.conftest import RunningServer, install_loras
from tests.helpers import generate_pixels, gradient_image, square_image, submit
from tests.test_image_edit import b64, upload

pytestmark = pytest.mark.anyio


@pytest.fixture
def server(uncached_server: RunningServer) -> RunningServer:
    """Without the result cache: a repeated request runs again, so equal images show determinism."""
    return uncached_server


FIXED = {"prompt": "a knight in silver armour", "steps": 3, "seed": 21}


def difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(int) - b.astype(int)).mean())


async def test_a_reference_steers_the_image_by_its_strength(server: RunningServer) -> None:
    client = server.client
    first, second = await upload(server, gradient_image(64)), await upload(server, square_image(64))
    _, plain = await generate_pixels(client, **FIXED)
    view, at_zero = await generate_pixels(client, **FIXED, references=[{"image": first, "strength": 0.0}])
    assert (at_zero == plain).all()  # strength 0: the image without it, pixel for pixel
    view, full = await generate_pixels(client, **FIXED, references=[{"image": first, "strength": 1.0}])
    assert difference(full, plain) > 3
    _, again = await generate_pixels(client, **FIXED, references=[{"image": first, "strength": 1.0}])
    assert (again == full).all()  # cached embeddings give the same image
    _, other = await generate_pixels(client, **FIXED, references=[{"image": second, "strength": 1.0}])
    assert difference(other, full) > 3
    _, after = await generate_pixels(client, **FIXED)
    assert (after == plain).all()  # a request without references after ones with them
    assert view["request"]["references"] == [
        {"image": first, "strength": 1.0, "mode": "full", "start": 0.0, "end": 1.0}
    ]
    assert view["request"]["ip_adapter"] == "tiny-plus"
    response = await client.get(view["images"][0]["url"])
    with Image.open(io.BytesIO(response.content)) as png:
        parameters = read_parameters(png) or ""
    assert "IP-Adapter: tiny-plus" in parameters and "References: full 1 [0-1]" in parameters


async def test_modes_and_step_ranges_act_on_their_own_blocks_and_steps(server: RunningServer) -> None:
    client = server.client
    image = b64(gradient_image(64))
    _, plain = await generate_pixels(client, **FIXED)
    found = {}
    cases: dict[str, dict[str, object]] = {
        "full": {"mode": "full"},
        "style": {"mode": "style"},
        "composition": {"mode": "composition"},
        "late": {"mode": "full", "start": 0.5},
    }
    for name, reference in cases.items():
        _, found[name] = await generate_pixels(
            client, **FIXED, references=[{"image": image, "strength": 1.0, **reference}]
        )
    for name in ("style", "composition", "late"):
        # A reference from halfway acts on the last, finest steps only: a small change, but a change.
        assert difference(found[name], plain) > (0.5 if name != "late" else 0.01), name
        assert difference(found[name], found["full"]) > 0.5, name
    assert difference(found["style"], found["composition"]) > 0.5
    view, both = await generate_pixels(
        client,
        **FIXED,
        references=[{"image": image, "mode": "style"}, {"image": b64(square_image(64)), "strength": 0.4, "end": 0.5}],
    )
    assert difference(both, plain) > 0.5 and len(view["request"]["references"]) == 2


async def test_references_with_pose_control_a_lora_and_inpainting_in_one_request(
    server: RunningServer, tiny_loras: dict[str, Path], tmp_path: Path
) -> None:
    install_loras(tmp_path / "data", tiny_loras)
    init, mask = gradient_image(64), square_image(64, (16, 16, 47, 47))
    view, pixels = await generate_pixels(
        server.client,
        **FIXED,
        control={"type": "openpose", "pose": "front"},
        loras=[{"name": "ink-lora", "weight": 0.8}],
        references=[{"image": b64(square_image(64))}],
        init_image=b64(init),
        mask=b64(mask),
        strength=1.0,
    )
    outside = np.asarray(mask.convert("L")) == 0
    assert (pixels[outside] == np.asarray(init)[outside]).all()
    request = view["request"]
    assert request["control"][0]["pose"] == "front" and request["loras"][0]["name"] == "ink-lora"
    assert request["references"] and request["mask"]


async def test_a_characters_references_apply_unless_the_request_brings_its_own(server: RunningServer) -> None:
    client = server.client
    hero = await client.post(
        "/v1/characters",
        json={
            "name": "brann",
            "description": "Brann, a dwarf smith",
            "references": [b64(gradient_image(64))],
            "defaults": {"reference_strength": 0.9},
        },
    )
    assert hero.status_code == 201, hero.text
    view, first = await generate_pixels(client, **FIXED, character="brann")
    used = view["request"]["references"]
    assert used == [{"image": hero.json()["references"][0], "strength": 0.9, "mode": "full", "start": 0.0, "end": 1.0}]
    _, second = await generate_pixels(client, **FIXED, character="brann")
    assert (first == second).all()  # the same character, prompt and seed: the same image
    own = await submit(client, **FIXED, character="brann", references=[{"image": b64(square_image(64))}])
    assert own["request"]["references"][0]["image"] != used[0]["image"]


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"references": [{"image": "up_" + "0" * 32}] * 5}, "references"),  # over max_references
        ({"references": [{"image": "bm90IGFuIGltYWdl"}]}, "references[0].image"),
        ({"references": [{"image": "up_" + "1" * 32}]}, "references[0].image"),
        ({"references": [{"image": "up_" + "0" * 32, "strength": 1.5}]}, "references[0].strength"),
        ({"references": [{"image": "up_" + "0" * 32, "mode": "face"}]}, "references[0].mode"),
        ({"ip_adapter": "tiny-plus"}, "ip_adapter"),
    ],
)
async def test_bad_references_are_refused_naming_the_field(
    server: RunningServer, fields: dict[str, object], field: str
) -> None:
    response = await server.client.post("/v1/generations", json={"prompt": "x", **fields})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == field
    assert (await server.client.get("/v1/generations")).json()["items"] == []


async def test_an_adapter_that_is_not_installed_is_refused(server: RunningServer) -> None:
    image = await upload(server, gradient_image(64))
    for extra, field in (
        ({"ip_adapter": "plus-face", "references": [{"image": image}]}, "ip_adapter"),
        ({"references": [{"image": image, "start": 0.5, "end": 0.5}]}, "references[0].end"),
    ):
        response = await server.client.post("/v1/generations", json={"prompt": "x", **extra})
        assert response.status_code == 422 and response.json()["error"]["field"] == field
        assert "plus-face" not in field or "tiny-plus" in response.json()["error"]["message"]


def test_the_recommended_adapter_names_the_files_diffusers_reads() -> None:
    assert (RECOMMENDED.subfolder, RECOMMENDED.file_name) == ("sdxl_models", "ip-adapter-plus_sdxl_vit-h.safetensors")
    assert RECOMMENDED.encoder_path == "models/image_encoder"  # ViT-H, beside sdxl_models in h94/IP-Adapter
    local = IpAdapterSource(source="/nowhere", weight_name="w.safetensors", image_encoder="image_encoder")
    assert local.is_local and not local.installed() and local.encoder_path == "image_encoder"


def _rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def engine_job(info: ModelInfo, seed: int, images: list[str], mode: str = "full", adapter: str = "") -> Job:
    """A tiny-model job with these reference images (none: no references at all), through the model's
    adapter under the name `adapter` when given."""
    installed = next(iter(info.ip_adapters))
    references = References(
        adapter=adapter or installed,
        source=info.ip_adapters[installed],
        images=[Reference(image=image, strength=0.7, mode=mode, start=0.0, end=1.0) for image in images],
    )
    return Job(
        model=info, prompt=f"hero {seed % 5}", negative_prompt="", width=64, height=64, seeds=[seed], steps=2,
        guidance_scale=5.0, scheduler="euler", references=references if images else None,
    )  # fmt: skip


def test_memory_stays_flat_across_many_reference_requests(tiny_model: Path, tmp_path: Path) -> None:
    """200 generations switching among 10 reference images, with and without references."""
    info = tiny_info(tiny_model)
    engine = EagerEngine(info, "cpu")
    images = []
    for index in range(10):
        path = tmp_path / f"ref-{index}.png"
        square_image(64, (index * 4, index * 4, 40 + index, 40 + index)).save(path)
        images.append(str(path))

    def job(index: int) -> Job:
        chosen = [images[index % 10]] + ([images[(index * 7) % 10]] if index % 2 else [])
        return engine_job(info, index, chosen if index % 3 else [])

    for index in range(30):  # warm: every image's embedding cached, allocator pools grown
        engine.run(job(index))
    gc.collect()
    before = _rss_bytes()
    for index in range(200):
        engine.run(job(index))
    gc.collect()
    grown = (_rss_bytes() - before) / 2**20
    print(f"RSS grew {grown:.1f} MiB over 200 requests")
    assert grown < 20
    engine.close()


def test_references_leave_the_unet_as_it_was(tiny_model: Path, tmp_path: Path) -> None:
    """Other jobs, batched ones included, run on the UNet without the adapter attached."""
    info = tiny_info(tiny_model)
    engine = EagerEngine(info, "cpu")
    processors = {name: type(p) for name, p in engine.pipe.unet.attn_processors.items()}
    path = tmp_path / "ref.png"
    gradient_image(64).save(path)
    first = np.asarray(engine.run(engine_job(info, 1, [str(path)], mode="style")).images[0])
    assert {name: type(p) for name, p in engine.pipe.unet.attn_processors.items()} == processors
    assert engine.pipe.unet.encoder_hid_proj is None
    # Another adapter replaces it (unloaded, then loaded), and switching back gives the same image again.
    engine.run(engine_job(info, 1, [str(path)], mode="style", adapter="another"))
    again = np.asarray(engine.run(engine_job(info, 1, [str(path)], mode="style")).images[0])
    assert (again == first).all()
    assert {name: type(p) for name, p in engine.pipe.unet.attn_processors.items()} == processors
    engine.close()
