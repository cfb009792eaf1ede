from __future__ import annotations

import io

import msgspec
import pytest
from PIL import Image

from actors.encoding import encode_image, read_parameters
from forge.infotext import infotext, parse_infotext
from forge.requests import GenerationSpec

SPEC = GenerationSpec(
    prompt="a paladin, gold trim: heroic",
    negative_prompt='lowres, "bad" hands',
    styles=[],
    width=832,
    height=1216,
    num_images=2,
    steps=30,
    guidance_scale=5.5,
    seed=42,
    scheduler="dpmpp_2m_karras",
    output_format="png",
    priority=0,
    model="stabilityai/stable-diffusion-xl-base-1.0",
    styled_prompt="a paladin, gold trim: heroic",
    styled_negative_prompt='lowres, "bad" hands',
)


def test_a1111_format_with_karras_schedule_and_quoting() -> None:
    text = infotext(SPEC, 43, "sd_xl_base_1.0")
    lines = text.split("\n")
    assert lines[0] == "a paladin, gold trim: heroic"
    assert lines[1] == 'Negative prompt: lowres, "bad" hands'
    assert lines[2].startswith(
        "Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 5.5, Seed: 43, "
        "Size: 832x1216, Model: sd_xl_base_1.0, Version: chara-forge "
    )
    prompt, negative, params = parse_infotext(text)
    assert (prompt, negative) == (SPEC.prompt, SPEC.negative_prompt)
    assert params["Seed"] == "43" and params["Schedule type"] == "Karras"


def test_values_with_separators_are_quoted_and_read_back() -> None:
    text = infotext(SPEC, 1, "my, model: v2")
    assert 'Model: "my, model: v2"' in text
    assert parse_infotext(text)[2]["Model"] == "my, model: v2"


def test_clip_skip_is_written_as_a1111_counts_it_and_read_back() -> None:
    for clip_skip in (1, 2):
        text = infotext(msgspec.structs.replace(SPEC, clip_skip=clip_skip), 43, "sd_xl_base_1.0")
        assert f"Clip skip: {clip_skip}, " in text and parse_infotext(text)[2]["Clip skip"] == str(clip_skip)
    assert "Clip skip" not in infotext(SPEC, 43, "sd_xl_base_1.0")  # recorded before it was: the model's default


@pytest.mark.parametrize("fmt", ["png", "webp", "jpeg"])
def test_parameters_round_trip_through_every_format(fmt: str) -> None:
    image = Image.new("RGB", (16, 16), (200, 30, 30))
    data = encode_image(image, fmt, "a knight\nSteps: 4, Seed: 9, ünïcödé ✓")
    decoded = Image.open(io.BytesIO(data))
    assert decoded.format == {"png": "PNG", "webp": "WEBP", "jpeg": "JPEG"}[fmt]
    assert read_parameters(decoded) == "a knight\nSteps: 4, Seed: 9, ünïcödé ✓"
